"""Tests: system tier."""
