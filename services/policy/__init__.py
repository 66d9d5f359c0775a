"""Policy service: every action is checked before it runs (rules, budgets, PII masking)."""
