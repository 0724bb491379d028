"""Clinical data: patient profiles, consultations, records, prescriptions, attachments."""
