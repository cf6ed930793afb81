"""Job documents and the catalog: each invalid input gets its own precise error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_fusion import errors
from mlx_fusion.jobs import Kind, parse_job
from mlx_fusion.registry.catalog import Catalog

LIMIT = 10_000


def chat(**input_fields: object) -> dict[str, object]:
    body = {"messages": [{"role": "user", "content": "hi"}], **input_fields}
    return {"kind": "chat.completion", "model": "tiny", "input": body}


def test_valid_chat_job_gets_generated_ids_and_defaults() -> None:
    job = parse_job(chat(max_tokens=5), max_input_bytes=LIMIT)
    assert job.kind is Kind.CHAT_COMPLETION
    assert len(job.spec.id) == 32 and job.spec.request_id.startswith("req_")
    assert job.spec.priority == "default"
    assert job.input.max_tokens == 5


def test_non_object_document_is_invalid_job() -> None:
    with pytest.raises(errors.JobValidationError) as e:
        parse_job(["not", "a", "document"], max_input_bytes=LIMIT)
    assert e.value.code == "invalid_job"


def test_missing_field_is_named() -> None:
    doc = chat()
    del doc["model"]
    with pytest.raises(errors.JobValidationError) as e:
        parse_job(doc, max_input_bytes=LIMIT)
    assert e.value.code == "invalid_job" and e.value.field == "model"


def test_bad_job_id_is_refused() -> None:
    with pytest.raises(errors.JobValidationError) as e:
        parse_job({**chat(), "id": "../../etc"}, max_input_bytes=LIMIT)
    assert e.value.field == "id"


def test_unknown_top_level_field_is_refused() -> None:
    with pytest.raises(errors.JobValidationError) as e:
        parse_job({**chat(), "fuction": "x"}, max_input_bytes=LIMIT)
    assert e.value.field == "fuction"


def test_unknown_kind_has_its_own_code() -> None:
    with pytest.raises(errors.UnknownKind) as e:
        parse_job({**chat(), "kind": "telepathy"}, max_input_bytes=LIMIT)
    assert e.value.code == "unknown_kind" and "telepathy" in e.value.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": 3.5}, "input.temperature"),
        ({"top_p": 0}, "input.top_p"),
        ({"top_k": -1}, "input.top_k"),
        ({"min_p": 1.5}, "input.min_p"),
        ({"repetition_penalty": 0}, "input.repetition_penalty"),
        ({"max_tokens": 0}, "input.max_tokens"),
        ({"n": 3}, "input.n"),
        ({"stream": 2}, "input.stream"),
        ({"stream_options": {"include_usage": True}}, "input.stream_options"),
        ({"stop": [""]}, "input.stop"),
        ({"logit_bias": {"1": 2}}, "input.logit_bias"),
    ],
)
def test_bad_sampling_values_are_invalid_input(fields: dict[str, object], field: str) -> None:
    with pytest.raises(errors.InvalidInput) as e:
        parse_job(chat(**fields), max_input_bytes=LIMIT)
    assert e.value.code == "invalid_input" and e.value.field == field


def test_empty_messages_are_invalid_input() -> None:
    doc = chat()
    doc["input"] = {"messages": []}
    with pytest.raises(errors.InvalidInput) as e:
        parse_job(doc, max_input_bytes=LIMIT)
    assert e.value.field == "input.messages"


def test_oversize_document_is_input_too_large() -> None:
    doc = chat()
    doc["input"] = {"messages": [{"role": "user", "content": "x" * LIMIT}]}
    with pytest.raises(errors.InputTooLarge) as e:
        parse_job(doc, max_input_bytes=LIMIT)
    assert e.value.code == "input_too_large" and str(LIMIT) in e.value.message


def test_completion_takes_exactly_one_prompt() -> None:
    doc = {"kind": "completion", "model": "tiny", "input": {"prompt": ["a", "b"]}}
    with pytest.raises(errors.InvalidInput):
        parse_job(doc, max_input_bytes=LIMIT)


def catalog(tmp_path: Path, text: str) -> Path:
    for model_dir in ("m/a", "p", "q"):
        (tmp_path / model_dir).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_catalog_resolves_ids_and_aliases_relative_to_its_file(tmp_path: Path) -> None:
    cat = Catalog.load(
        catalog(tmp_path, '[models.a]\nkind = "lm"\npath = "m/a"\naliases = ["x"]\n')
    )
    assert cat.resolve("x").id == "a"
    assert cat.resolve("a").path == (tmp_path / "m" / "a").resolve()


@pytest.mark.parametrize("name", ["/etc/passwd", "./m/a", "../a", "~/models/a", "m\\a", "a/../b"])
def test_a_path_is_never_a_model(tmp_path: Path, name: str) -> None:
    cat = Catalog.load(catalog(tmp_path, '[models.a]\nkind = "lm"\npath = "m/a"\n'))
    with pytest.raises(errors.ModelPathNotAllowed) as e:
        cat.resolve(name)
    assert e.value.code == "model_path_not_allowed"


def test_unknown_model_lists_known_names(tmp_path: Path) -> None:
    cat = Catalog.load(catalog(tmp_path, '[models.a]\nkind = "lm"\npath = "m/a"\n'))
    with pytest.raises(errors.ModelNotFound) as e:
        cat.resolve("org/other-model")
    assert e.value.code == "model_not_found" and "a" in e.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[models.a]\nkind = "sorcery"\npath = "p"\n', "model 'a': field 'kind'"),
        ('[models.a]\nkind = "lm"\n', "model 'a': Value error, give exactly one of"),
        ('[models.a]\nkind = "lm"\npath = "nowhere"\n', "model 'a': field 'path': "),
        ('[models.a]\nkind = "lm"\npath = "p"\nhub = "o/m"\n', "give exactly one of"),
        ('[models.a]\nkind = "lm"\nhub = "org/never-cached-xyz"\n', "field 'hub': 'org/never"),
        ('[models.a]\nkind = "lm"\npath = "p"\nkeep_alive_s = -5\n', "keep_alive_s must be -1"),
        ('[models.a]\nkind = "lm"\npath = "p"\ncolour = 1\n', "model 'a': field 'colour'"),
        (
            '[models.a]\nkind = "lm"\npath = "p"\naliases = ["b"]\n[models.b]\nkind = "lm"\n'
            'path = "q"\n',
            "model 'b': name 'b' is already used by 'a'",
        ),
        ("[models.a\n", "cannot read catalog"),
    ],
)
def test_catalog_errors_name_file_model_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = catalog(tmp_path, text)
    with pytest.raises(errors.CatalogError) as e:
        Catalog.load(path)
    assert str(path) in e.value.message and expected in e.value.message
