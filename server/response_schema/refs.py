"""JSON pointers: how the check names a place in the schema, and how xgrammar 0.2.8 follows
a local `$ref`, which it reads otherwise than JSON Schema in places (it takes `~0`, `~1`
and `%25` escapes as written and skips empty names: "#/$defs/a~1b" followed "a~1b", not
"a/b", and "#/" the root, not the name ""; it follows no pointer into an array either,
failing to compile as for a `$ref` to nothing). A `$ref` outside the document it ignores."""

from urllib.parse import unquote


def escape(token: str) -> str:
    """`token` as one JSON pointer step."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer_of(path: tuple) -> str:
    """The JSON pointer of a nested (parent path, key or index) tuple."""
    steps: list[str] = []
    while path:
        path, step = path
        steps.append(escape(step) if isinstance(step, str) else str(step))
    return "/".join(["#", *reversed(steps)])


def resolve(root: object, ref: str) -> object | None:
    """The target of a local `$ref` ("#" or a JSON pointer "#/...") as xgrammar 0.2.8 reads
    it, or None: each name as written (it decodes no `~0`, `~1` or `%` escape), empty names
    skipped ("#/" is the root), and through objects only (in an array it finds no field
    "0"). `misread_ref` refuses the pointers JSON Schema reads otherwise."""
    if not is_local(ref):
        return None
    node = root
    for token in ref[2:].split("/"):
        if not token:
            continue
        if not isinstance(node, dict) or token not in node:
            return None
        node = node[token]
    return node


def is_local(ref: str) -> bool:
    """Whether `ref` is a pointer xgrammar follows ("#" or "#/...")."""
    return ref == "#" or ref.startswith("#/")


def id_keyword(root: dict) -> str:
    """The keyword that gives a subschema a base URI: `id` in a draft-04 schema (where `$id`
    means nothing), `$id` in later drafts."""
    schema_uri = root.get("$schema")
    return "id" if isinstance(schema_uri, str) and "draft-04/" in schema_uri else "$id"


def own_base(node: dict, keyword: str = "$id") -> str | None:
    """`node`'s `keyword` (id_keyword) where it gives the subschema a base URI of its own,
    against which JSON Schema resolves the pointers of the `$ref`s in it, or None (none, or a
    fragment alone: draft-04 to -07 name an anchor so, "$id": "#a")."""
    base = node.get(keyword)
    return base if isinstance(base, str) and base.split("#", 1)[0] else None


def misread_ref(ref: str) -> str | None:
    """Why xgrammar reads the local `$ref` `ref` otherwise than JSON Schema does, or None:
    it takes a name's escapes as written ("#/$defs/a~1b" found "a~1b", not "a/b": with both
    names defined it followed "a~1b", with "a/b" alone its compile failed; `~0` and `%25`
    alike) and skips an empty name ("#/" and "#//" read as "#", "#/$defs/a/" as
    "#/$defs/a"), where JSON Schema looks for the name ""."""
    for token in ref[2:].split("/") if ref.startswith("#/") else []:
        unescaped = unquote(token).replace("~1", "/").replace("~0", "~")
        if not token:
            why = "it skips an empty name in a pointer (`//`, or a `/` at its end) where JSON Schema looks for the "
            return why + 'name ""; leave the empty name out, and put its target under a name'
        if unescaped != token:
            why = f"it reads a pointer's escapes as written, looking for the name {token!r} where JSON Schema reads "
            return why + f"{unescaped!r}; rename the target so that its pointer needs no `~` or `%` escape"
    return None
