"""The OpenAPI schema, fuzzed: schemathesis generates requests, valid and invalid, for every operation.
No answer may be a server error, garbage must be refused, every answer must match the schema, and a
request the key made succeed must be refused without it (auth not ignored).
Examples are bounded per operation so the suite stays fast; the number run is printed."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.helpers import bearer, sentiment_file

EXAMPLES_PER_OPERATION = 25


def _fuzzer(operation, examples: dict[str, int], past_auth: set[str], key: str):
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run: a failure in CI reproduces here
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        examples[operation.label] = examples.get(operation.label, 0) + 1
        # Not positive_data_acceptance: the schema cannot say what a valid dataset file or template is,
        # so some schema-valid requests are rightly refused with a 4xx that names the fault.
        response = case.call_and_validate(
            headers=bearer(key), additional_checks=[ignored_auth], excluded_checks=[positive_data_acceptance]
        )
        if response.status_code != 401:
            past_auth.add(operation.label)

    return fuzz


def test_no_request_gets_a_server_error_or_an_answer_outside_the_schema(client, api_key):
    # Something to find: a dataset, so generated ids hit real rows as well as missing ones.
    client.post("/v1/datasets", files={"file": ("train.jsonl", sentiment_file())})
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    examples: dict[str, int] = {}
    past_auth: set[str] = set()
    for result in schema.get_all_operations():
        _fuzzer(result.ok(), examples, past_auth, api_key)()
    print(f"schemathesis: {sum(examples.values())} examples over {len(examples)} operations: {examples}")
    assert len(examples) >= 10
    # The key was used: every operation's requests got past authentication, not only to a 401.
    assert past_auth == set(examples)
