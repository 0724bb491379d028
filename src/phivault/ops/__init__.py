"""What belongs to no one domain: outgoing mail (staff invitations, break-glass notices), the
Redis client every shared store uses, and what counts as a loopback address."""
