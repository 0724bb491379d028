"""Who may do what: roles, route access rules, and (next) care relationships and consent."""
