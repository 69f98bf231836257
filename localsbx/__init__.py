"""localsbx: local, offline emulator and test harness for Tensorlake-style sandbox images."""
