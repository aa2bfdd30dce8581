"""Every kind of Ray process a run starts, one module each: its decorator, name, resources and the
typed spec it accepts. The logic they run lives in the plain, testable modules they import.
tests/roles/test_every_process_has_a_role.py checks that no Ray remote function, actor class, Serve deployment or named actor
is defined anywhere else."""
