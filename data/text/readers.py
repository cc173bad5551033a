"""
Documents out of a user's files, streamed: no file is ever read whole (except a .json
file that holds one JSON array), so memory stays bounded however large the corpus is.

    .txt                 the file is one document (cut at line breaks into pieces of at
                         most max_doc_chars characters)
    .jsonl               one JSON object per line; the document is its text field
    .json                a JSON array of such objects (read whole), or JSON lines
    .parquet             one row per document, the text column (needs pyarrow)
    .txt.gz, .jsonl.gz, .json.gz   the same, gzip-compressed

A document's domain (--domain_from):
    dir          the top-level entry it comes from: for an input directory, the
                 subdirectory directly under it (files directly in it: the directory's
                 own name); for an input file, its name without the suffix
    field:NAME   the record's field NAME (.jsonl/.json/.parquet)
    fixed:NAME   NAME for every document

Every problem with a file (missing, not UTF-8, a line that is not JSON or lacks the
field, a parquet file without the column) is a ValueError/FileNotFoundError of one line
that names the file (and line) and the fix.
"""
import codecs
import gzip
import json
import os

try:
    import pyarrow.parquet as pq
except ImportError:      # parquet inputs then fail with one line naming the fix
    pq = None

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
         ".txt.gz": "txt", ".jsonl.gz": "jsonl", ".json.gz": "json"}
READ_BLOCK = 1 << 20             # bytes per read of a .txt file (a file without line breaks included)
PARQUET_BATCH_ROWS = 1024


def split_suffix(name):
    """(stem, suffix) for a known input suffix (suffix None when the name has none of KINDS)."""
    for suffix in sorted(KINDS, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], suffix
    return name, None


def parse_domain_from(spec):
    """--domain_from -> ("dir", None) | ("field", NAME) | ("fixed", NAME)."""
    kind, _, name = spec.partition(":")
    if spec == "dir" or (kind in ("field", "fixed") and name):
        return kind, name or None
    raise ValueError(f"--domain_from={spec!r} is not one of dir, field:NAME, fixed:NAME")


def list_inputs(inputs, exclude=()):
    """Files to read, as (path, kind, top) in a fixed order (inputs in the order given, each
    directory walked in sorted order, hidden entries skipped), plus the number of files
    skipped for an unknown suffix. top is the --domain_from=dir domain. Paths under
    `exclude` (the output directory) are never read."""
    files, skipped = [], 0
    exclude = [os.path.abspath(e) for e in exclude]
    for inp in inputs:
        if not os.path.exists(inp):
            raise FileNotFoundError(f"input {inp} does not exist: check the path")
        if os.path.isfile(inp):
            stem, suffix = split_suffix(os.path.basename(inp))
            if suffix is None:
                raise ValueError(f"input {inp} is not a {', '.join(KINDS)} file: rename it or convert it")
            files.append((inp, KINDS[suffix], stem))
            continue
        root_name = os.path.basename(os.path.normpath(os.path.abspath(inp)))
        for dirpath, dirnames, filenames in os.walk(inp):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and os.path.abspath(os.path.join(dirpath, d)) not in exclude)
            for name in sorted(f for f in filenames if not f.startswith(".")):
                path = os.path.join(dirpath, name)
                suffix = split_suffix(name)[1]
                if suffix is None:
                    skipped += 1
                    continue
                rel = os.path.relpath(path, inp).split(os.sep)
                files.append((path, KINDS[suffix], rel[0] if len(rel) > 1 else root_name))
    return files, skipped


def _open_binary(path):
    """(binary file, function giving the bytes of `path` consumed so far)."""
    f = open(path, "rb")
    if not path.endswith(".gz"):
        return f, f.tell
    gz = gzip.GzipFile(fileobj=f)
    return gz, f.tell


def _decode(raw, decoder, path, line_no):
    try:
        return decoder.decode(raw)
    except UnicodeDecodeError as e:     # line_no is the first line of `raw`
        line_no += e.object[:e.start].count(b"\n")
        raise ValueError(f"{path} line {line_no} is not UTF-8 (byte 0x{e.object[e.start]:02x}): convert the "
                         f"file (iconv -f LATIN1 -t UTF-8) or pass --encoding_errors=replace") from None


def cut_point(text, start, max_chars):
    """End of the piece of `text` that begins at `start` and is at most max_chars long: after
    the last line break in the second half of that span, else at max_chars."""
    return text.rfind("\n", start + max_chars // 2, start + max_chars) + 1 or start + max_chars


def read_txt(path, max_doc_chars, errors="strict"):
    """Yield (text, None, bytes_read): the file as documents of at most max_doc_chars characters."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    f, position = _open_binary(path)
    with f:
        line_no, pending = 1, ""
        while True:
            raw = f.read(READ_BLOCK)
            pending += _decode(raw, decoder, path, line_no) if raw else decoder.decode(b"", final=True)
            line_no += raw.count(b"\n")
            start = 0
            while len(pending) - start > max_doc_chars:
                cut = cut_point(pending, start, max_doc_chars)
                yield pending[start:cut], None, position()
                start = cut
            pending = pending[start:]
            if not raw:
                break
        if pending:
            yield pending, None, position()


def _field(record, name, path, where, what):
    """record[name] as a string (None for null); a one-line error when it is missing or not text."""
    if not isinstance(record, dict):
        raise ValueError(f"{path} {where} is a JSON {type(record).__name__}, not an object: "
                         f"each record must be an object with a {name!r} field")
    if name not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise ValueError(f"{path} {where} has no field {name!r} (its fields: {keys}): pass {what}=NAME")
    value = record[name]
    if value is None or isinstance(value, str):
        return value
    if what == "--domain_from=field:" and isinstance(value, (int, bool)):
        return str(value)
    raise ValueError(f"{path} {where}: field {name!r} is a {type(value).__name__}, not a string: "
                     f"choose the text field with {what}=NAME")


def _records(path, errors):
    """Yield (record, where, bytes_read) of a JSON-lines file, or of a .json file holding one array."""
    f, position = _open_binary(path)
    with f:
        head = f.read(64).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                records = json.loads(f.read().decode("utf-8", errors))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start}): "
                                 f"convert it or pass --encoding_errors=replace") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                                 f"fix the file") from None
            for i, record in enumerate(records):
                yield record, f"record {i}", position()
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors)
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, decoder, path, line_no)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not JSON ({e.msg} at column {e.colno}): "
                                 f"fix or remove the line") from None
            yield record, f"line {line_no}", position()


def read_json(path, text_field, domain_field=None, errors="strict"):
    """Yield (text or None, domain or None, bytes_read) of every record of a .jsonl/.json file."""
    for record, where, pos in _records(path, errors):
        text = _field(record, text_field, path, where, "--text_field")
        domain = _field(record, domain_field, path, where, "--domain_from=field:") if domain_field else None
        yield text, domain, pos


def read_parquet(path, text_field, domain_field=None):
    """Yield (text or None, domain or None, bytes_read) of every row of a .parquet file."""
    if pq is None:
        raise ValueError(f"{path}: reading .parquet files needs pyarrow, which is not installed: "
                         f"pip install pyarrow (or convert the file to .jsonl)")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:     # pyarrow raises its own ArrowInvalid / OSError subclasses
        raise ValueError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:120]}): "
                         f"check the file") from None
    names = pf.schema_arrow.names
    for name, what in ((text_field, "--text_field"), (domain_field, "--domain_from=field:")):
        if name and name not in names:
            raise ValueError(f"{path} has no column {name!r} (its columns: {', '.join(names[:8])}): "
                             f"pass {what}=NAME")
    columns = [text_field] + ([domain_field] if domain_field else [])
    size, rows, done = os.path.getsize(path), max(1, pf.metadata.num_rows), 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        texts = batch.column(0).to_pylist()
        domains = batch.column(1).to_pylist() if domain_field else [None] * len(texts)
        for i, (text, domain) in enumerate(zip(texts, domains)):
            where = f"row {done + i}"
            record = {text_field: text, **({domain_field: domain} if domain_field else {})}
            yield (_field(record, text_field, path, where, "--text_field"),
                   _field(record, domain_field, path, where, "--domain_from=field:") if domain_field else None,
                   size * (done + i + 1) // rows)
        done += len(texts)


def read_file(path, kind, text_field, domain_field, max_doc_chars, errors="strict"):
    """Yield (text, domain or None, bytes_read) of one input file; records longer than
    max_doc_chars are cut like .txt files, empty ones come as ""."""
    if kind == "txt" and domain_field:
        raise ValueError(f"{path} is a text file, which has no fields for --domain_from=field:{domain_field}: "
                         f"use --domain_from=dir or fixed:NAME, or give records (.jsonl/.parquet)")
    try:
        if kind == "txt":
            yield from read_txt(path, max_doc_chars, errors)
            return
        records = (read_parquet(path, text_field, domain_field) if kind == "parquet"
                   else read_json(path, text_field, domain_field, errors))
        for text, domain, pos in records:
            text, start = text or "", 0
            while len(text) - start > max_doc_chars:
                cut = cut_point(text, start, max_doc_chars)
                yield text[start:cut], domain, pos
                start = cut
            yield text[start:], domain, pos
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e}): download or compress it again") from None
