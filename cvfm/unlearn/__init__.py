"""Machine unlearning: forget requests, exact and approximate methods, the audit and the deletion ledger."""
