"""`softprompt keys`: a key is shown once, only its hash is kept, and a revoked key stops working."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from app.db.session import get_engine, session_scope
from app.services.tenancy.api_keys import tenant_for_key
from tests.helpers import softprompt


def create(stack, tenant: str) -> str:
    made = softprompt(stack, "keys", "create", "--tenant", tenant)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]  # the key alone on the last line, for scripts


@pytest.mark.servers
def test_a_key_is_shown_once_and_the_database_keeps_only_its_hash(stack):
    key = create(stack, "acme")
    assert key.startswith("sp_") and len(key) > 40
    with get_engine(stack.database_url).connect() as connection:
        dump = [
            str(row)
            for table in ("tenants", "api_keys")
            for row in connection.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
        ]
    assert not any(key in row or key[len("sp_") :] in row for row in dump)
    assert any(hashlib.sha256(key.encode()).hexdigest() in row for row in dump)
    with session_scope(stack.database_url) as session:
        assert tenant_for_key(session, key).name == "acme"
        assert tenant_for_key(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None


def test_keys_are_listed_by_prefix_and_a_revoked_key_no_longer_authenticates(stack):
    first, second = create(stack, "acme"), create(stack, "globex")
    listed = softprompt(stack, "keys", "list").stdout
    assert first[:11] in listed and second[:11] in listed
    assert first not in listed and second not in listed
    only = softprompt(stack, "keys", "list", "--tenant", "globex").stdout.splitlines()
    assert len(only) == 1 and "globex" in only[0] and only[0].endswith("active")

    key_id = only[0].split("\t")[0]
    revoked = softprompt(stack, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with session_scope(stack.database_url) as session:
        assert tenant_for_key(session, second) is None
        assert tenant_for_key(session, first).name == "acme"
    assert "revoked" in softprompt(stack, "keys", "list", "--tenant", "globex").stdout


def test_bad_tenant_names_and_unknown_keys_are_refused_with_a_message(stack):
    bad = softprompt(stack, "keys", "create", "--tenant", "Not A Name")
    assert bad.returncode == 2 and "tenant 'Not A Name'" in bad.stderr and bad.stdout == ""
    unknown = softprompt(stack, "keys", "revoke", "999")
    assert unknown.returncode == 2 and "No API key with id 999" in unknown.stderr
