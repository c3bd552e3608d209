"""Draft-stop policies, one module each; control.py registers them (see policies/base.py for the contract)."""
