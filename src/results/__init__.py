"""What a run leaves on disk: its timestamped result directory, files written atomically, the lock.

May import errors and config only.
"""
