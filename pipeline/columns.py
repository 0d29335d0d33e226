"""What a job reads from each input file and writes for it, decided from the file's schema alone: the row id, the
prompt or messages column and its type, the kept columns. A file that does not fit is refused before any work, with
the file, the column, its type and what is expected."""
from __future__ import annotations

import pyarrow as pa

from workers.rows import RESULT_SCHEMA

from .config import ConfigError, JobConfig
from .source import InputFile


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def is_messages(kind: pa.DataType) -> bool:
    """A list of structs with string `role` and `content` (more fields are allowed and ignored)."""
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_list_view(kind)
            or pa.types.is_fixed_size_list(kind)) or not pa.types.is_struct(kind.value_type):
        return False
    item = kind.value_type
    return all(item.get_field_index(n) >= 0 and is_text(item.field(n).type) for n in ("role", "content"))


def id_column(file: InputFile, config: JobConfig) -> str | None:
    """The column holding this file's row ids, or None for made-up ones ('<file name>:<row index>')."""
    if config.id_column == "auto":
        return "id" if "id" in file.schema.names else None
    return config.id_column


def check_columns(file: InputFile, config: JobConfig) -> None:
    names = file.schema.names
    where = f"input file {file.path}"
    source = config.source_column
    if source not in names:
        hint = ("; for chat input set messages_column" if config.messages_column is None and "messages" in names
                else "; set prompt_column to the column holding the prompts")
        raise ConfigError(f"{where} has no column {source!r} (columns: {', '.join(names)}){hint}")
    kind = file.schema.field(source).type
    if config.messages_column and not is_messages(kind):
        raise ConfigError(f"{where}: column {source!r} is {kind}; expected a list of struct<role: string, content: "
                          f"string> (chat messages)")
    if not config.messages_column and not is_text(kind):
        raise ConfigError(f"{where}: column {source!r} is {kind}; expected a string column of prompt texts (or set "
                          f"prompt_column to the column holding them)")
    ids = id_column(file, config)
    if ids is not None and ids not in names:
        raise ConfigError(f"{where} has no id column {ids!r} (columns: {', '.join(names)}); set id_column to one of "
                          f"them, or to auto")
    for name in config.kept:
        if name == "id":
            if ids is None and "id" in names:
                raise ConfigError(f"{where} has its own 'id' column; set id_column: id (or auto) to use it as the "
                                  f"row id, or leave 'id' out of keep_columns")
        elif name not in names:
            raise ConfigError(f"{where} has no column {name!r} to keep (columns: {', '.join(names)})")
        elif name in RESULT_SCHEMA.names:
            raise ConfigError(f"{where}: kept column {name!r} would collide with the output column of that name")
    if len(set(config.kept)) != len(config.kept):
        raise ConfigError(f"keep_columns lists a column twice: {config.kept}")


def output_schema(file: InputFile, config: JobConfig) -> pa.Schema:
    ids, fields = id_column(file, config), []
    for name in config.kept:
        if name == "id" and ids is None:
            fields.append(pa.field("id", pa.string()))
        elif name == "id":
            fields.append(file.schema.field(ids).with_name("id"))
        else:
            fields.append(file.schema.field(name))
    return pa.schema(fields + list(RESULT_SCHEMA))


def kept_read(file: InputFile, config: JobConfig) -> list[str]:
    """The input columns read to copy the kept ones (the id column under its own name)."""
    ids = id_column(file, config)
    return [ids if c == "id" else c for c in config.kept if c != "id" or ids is not None]
