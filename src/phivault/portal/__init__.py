"""The privacy portal (SPEC §15): server-rendered pages for patients and auditors at `/portal`."""
