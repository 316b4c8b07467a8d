"""densekit.export"""
