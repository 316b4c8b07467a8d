"""densekit.train"""
