"""Guards on what a client sends the generation server, applied before a job is built.

Every check raises :class:`InvalidInput` (400 malformed, 413 too large, 422 out of range)
naming the field (``stepvideo.job_server.requests`` turns it into its ``InvalidInput``), so nothing
a client can send reaches the queue, the database or a 500. What is checked:

* the JSON body: valid UTF-8, nesting at most :data:`MAX_JSON_DEPTH` levels (checked without
  parsing, so a hostile body cannot make the parser recurse; about a second for 32 MiB of
  brackets), no bare ``NaN``/``Infinity``;
* every field value (JSON or form): strings encodable as UTF-8 (no lone surrogates, which JSON
  escapes such as ``"\\ud800"`` can carry), numbers finite and within :data:`NUMBER_BOUNDS`,
  no nested object or array where a plain value is expected;
* the number of form fields (:data:`MAX_FORM_FIELDS`), so a url-encoded body of a million
  fields is refused before it is parsed, and error bodies stay short (:func:`name_some`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from werkzeug.exceptions import RequestEntityTooLarge

from ..caption_service.protocol import nesting_within

MAX_JSON_DEPTH = 8            # a job is a flat object; 8 leaves room for small structured fields
LARGEST_INT = 2 ** 63         # beyond, integers overflow float conversions (and mean nothing here)
MAX_FORM_FIELDS = 64          # form fields (and uploads) of one multipart or url-encoded body
MAX_FORM_FIELD_BYTES = 1 << 20   # one text field of a multipart body (files are uploads, not fields)
MAX_NAMES_SHOWN = 5           # names listed in one error message
MAX_NAME_CHARS = 40           # characters of one client-chosen name shown in an error
# API field -> (lowest, highest) accepted value; beyond these a job overflows (cfg_scale 1e308) or
# means nothing. Names the schema does not have are harmless here.
NUMBER_BOUNDS = {"cfg_scale": (0.0, 100.0), "guidance_scale": (0.0, 100.0), "time_shift": (0.0, 1000.0),
                 "flow_shift": (0.0, 1000.0), "motion_score": (-1000.0, 1000.0), "seconds": (0.0, 3600.0)}


class InvalidInput(ValueError):
    """A refused body: ``status`` 400, 413 or 422; ``field`` the field at fault (or None)."""

    def __init__(self, message: str, field: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


def parse_json_body(data: bytes) -> Any:
    """The request body -> JSON value; 400 for invalid UTF-8, deep nesting, NaN/Infinity or bad JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"the body is not valid UTF-8 (byte {err.start})") from None
    if not nesting_within(data, MAX_JSON_DEPTH):
        raise InvalidInput(f"the body nests more than {MAX_JSON_DEPTH} levels deep (or its brackets do not pair up)")

    def no_constant(name: str) -> Any:
        raise InvalidInput(f"the body holds {name}: numbers must be finite (JSON has no {name})")

    try:
        return json.loads(text or "null", parse_constant=no_constant)
    except InvalidInput:
        raise
    except (ValueError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "malformed"
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise InvalidInput(f"the body is not valid JSON ({reason}{where})") from None


def check_form_size(field_count: int) -> None:
    """413 before parsing a form body with more than :data:`MAX_FORM_FIELDS` fields."""
    if field_count > MAX_FORM_FIELDS:
        raise InvalidInput(f"the form has {field_count} or more fields; at most {MAX_FORM_FIELDS} are accepted",
                           status=413)


def check_values(fields: Mapping[str, Any]) -> None:
    """Every value of a job body: text valid, numbers finite and bounded, no nesting."""
    for name, value in fields.items():
        shown = show_name(name)
        check_text(name, "field name")
        if isinstance(value, str):
            check_text(value, f"field '{shown}'", shown)
        elif isinstance(value, int) and not isinstance(value, bool) and not -LARGEST_INT <= value < LARGEST_INT:
            raise InvalidInput(f"field '{shown}' is out of range (at most 2**63 in magnitude)", shown, 422)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"field '{shown}' must be a finite number, got {value}", shown)
        elif isinstance(value, (dict, list)):
            raise InvalidInput(f"field '{shown}' must be a plain value, got a JSON "
                               f"{'object' if isinstance(value, dict) else 'array'}", shown)
        bounds = NUMBER_BOUNDS.get(name)
        if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = bounds
            if not low <= value <= high:
                raise InvalidInput(f"field '{shown}' must be in [{low:g}, {high:g}], got {value:g}", shown, 422)


def check_text(text: str, what: str, field: Any = None) -> None:
    """400 for text that is not valid Unicode (a lone surrogate), naming ``what`` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInput(f"{what} holds an invalid character (a lone surrogate) at position {err.start}; "
                           "send valid UTF-8 text", field) from None


def show_name(name: Any) -> str:
    """A client-chosen name, safe and short enough to repeat in an error message."""
    text = str(name).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS - 3] + "..."


def name_some(names: Iterable[Any]) -> str:
    """At most :data:`MAX_NAMES_SHOWN` names, quoted, and how many more there are."""
    names = list(names)
    shown = ", ".join(f"'{show_name(n)}'" for n in names[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def read_form(request: Any, upload_names: Tuple[str, ...]) -> Tuple[Dict[str, str], Dict[str, bytes]]:
    """A multipart or url-encoded flask ``request`` -> (text fields, uploads as bytes), bounded:
    at most :data:`MAX_FORM_FIELDS` fields, :data:`MAX_FORM_FIELD_BYTES` per text field, uploads
    only under ``upload_names``."""
    if (request.mimetype or "").lower() == "application/x-www-form-urlencoded":
        check_form_size(request.get_data(cache=True).count(b"&") + 1)   # counted before parsing
    request.max_form_parts = MAX_FORM_FIELDS
    request.max_form_memory_size = MAX_FORM_FIELD_BYTES
    try:
        form, files = request.form, request.files
    except RequestEntityTooLarge:
        if request.content_length is not None and request.content_length > (request.max_content_length or 0) > 0:
            raise                   # the whole body is over the server's limit: the app's 413 says so
        raise InvalidInput(f"the form has more than {MAX_FORM_FIELDS} parts or a text field over "
                           f"{MAX_FORM_FIELD_BYTES} bytes; send files as uploads", status=413) from None
    unknown = sorted(set(files) - set(upload_names))
    if unknown:
        raise InvalidInput(f"unknown upload field(s) {name_some(unknown)}; only {name_some(upload_names)} "
                           "may be a file", show_name(unknown[0]))
    return form.to_dict(), {name: files[name].read() for name in upload_names if name in files}
