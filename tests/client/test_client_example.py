"""`examples/client_example.py` against a fake server whose attachments have hostile names: it
saves each under its id, inside the folder it was given, whatever name the uploader chose."""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from phivault.client import attachment_file_name
from tests.client.fakes import PATIENT_ID, SESSION, Fake, answer, streamed

EXAMPLE = Path(__file__).parents[2] / "examples" / "client_example.py"
PDF = b"%PDF-1.7\nPWNED\n"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("client_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attachment_file_names_are_the_id_and_a_suffix() -> None:
    attachment_id = uuid.uuid4()
    assert attachment_file_name(attachment_id, "application/pdf") == f"{attachment_id}.pdf"
    assert attachment_file_name(str(attachment_id).upper(), "image/JPEG; x=y") == \
        f"{attachment_id}.jpg"
    assert attachment_file_name(attachment_id, "text/html") == f"{attachment_id}.bin"
    with pytest.raises(ValueError, match="UUID"):
        attachment_file_name("../../.bashrc", "application/pdf")


async def test_the_example_saves_attachments_inside_its_folder(tmp_path: Path) -> None:
    hostile = ["../escaped.txt", str(tmp_path / "absolute.txt"), ".bashrc"]
    listed = [{"id": str(uuid.uuid4()), "patient_id": PATIENT_ID, "uploader_id": PATIENT_ID,
               "filename": name, "content_type": "application/pdf", "size": len(PDF),
               "created_at": "2031-01-01T00:00:00Z"} for name in hostile]

    def server(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/api/v1/attachments/"):
            return streamed(200, PDF, **{"Content-Type": "application/pdf"})
        if path.endswith("/attachments"):
            return answer(200, listed, **{"X-Total-Count": str(len(listed))})
        if path.endswith("/me/consents"):
            return answer(200, {"marketing": False, "data_sharing": True, "analytics": False,
                                "consent_date": "2031-01-01T00:00:00Z"})
        return answer(200, [], **{"X-Total-Count": "0"})

    save_to = tmp_path / "saved"
    save_to.mkdir()
    fake = Fake("sync", server, tokens=SESSION)
    try:
        load_example().show_patient(fake.client, PATIENT_ID, save_to)
    finally:
        await fake.close()

    assert sorted(os.listdir(tmp_path)) == ["saved"]
    assert sorted(os.listdir(save_to)) == sorted(f"{item['id']}.pdf" for item in listed)
    assert all((save_to / name).read_bytes() == PDF for name in os.listdir(save_to))
