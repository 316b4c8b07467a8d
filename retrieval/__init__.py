"""densekit.retrieval"""
