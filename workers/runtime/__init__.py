"""What every job process does first: its log routing, its memory bound and peak. Imports nothing of ours.
"""
