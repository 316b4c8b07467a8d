"""densekit.apps"""
