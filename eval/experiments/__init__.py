"""Experiments as typed settings: what decides a generation (``settings``) and what a sweep will cost (``plan``)."""
