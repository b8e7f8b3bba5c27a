"""Integrations of ADSC into serving engines (:mod:`adsc_ext.integrations.vllm`)."""
