"""What belongs to no one domain: outgoing mail (staff invitations, break-glass notices)."""
