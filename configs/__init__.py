"""Experiment configs, one file per experiment (`get_config(arg)`, big_vision style).

Launchers take a file path (`--config=configs/icl_regression.py:runlocal`); code and
notebooks may import them (`from configs import icl_regression`).
"""
