"""Completion webhooks (signed per Standard Webhooks, retried): built in their own issue.

The job document already carries ``webhook {url}``; nothing is delivered yet.
"""
