"""`sloserve tune`: search serving configurations by simulation (space.py, search.py), report
and write the winner (command.py), and check the best on the real engine (verify.py)."""
