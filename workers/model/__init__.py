"""A model outside training: walked block by block, and the one loss. May import storage, data, methods.
"""
