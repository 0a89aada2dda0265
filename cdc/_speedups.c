/* The per-change loops of the CDC path in C: framing, the tuple loop, and typed rows.
 *
 * Optional. Each function here has a Python twin that `cdc` uses when the extension was not
 * built; both take and return the same values and fail the same way (tests/test_decoder.py,
 * tests/test_replication.py and tests/test_changes.py run their cases through both and fuzz one
 * against the other).
 *
 * read_cells(buf: bytes, pos: int, ncols: int, unchanged: object) -> (tuple, int)
 *     Twin: cdc.decoder.read_cells_py. Reads `ncols` TupleData cells of `buf` starting at
 *     `pos` (just past the column count) and returns them with the position after the last
 *     one: 't' and 'b' cells as bytes, 'n' as None, 'u' as `unchanged`. It fails exactly where
 *     and how the Python loop does: IndexError where that one would read a cell kind past the
 *     end, ValueError (same message) for an unknown kind or a last cell whose length runs past
 *     the end.
 *
 * read_insert(buf: bytes, relations: dict, insert: type, unchanged: object) -> Insert | None
 *     Twin: cdc.decoder.read_insert_py. A whole well-formed Insert message in one call: the
 *     `insert` tuple class made from the cached relation and the cells. None for anything else
 *     (unknown relation, wrong marker or width, a bad or trailing byte): the decoder's general
 *     path then reports it.
 *
 * xlog_data(buf: object, cls: type) -> XLogData | None
 *     Twin: cdc.replication.xlog_data_py. A CopyData 'w' message in bytes as the `cls` tuple
 *     (data_start, wal_end, send_time, payload); None for anything else (another kind, a
 *     short one, another buffer type).
 *
 * load_row(names, codes, loaders, raw_json, unchanged, cells) -> dict
 * load_values(codes, loaders, raw_json, unchanged, cells) -> tuple
 *     Twins: cdc.rows.load_row_py, cdc.rows.load_values_py (the cells come last, so that a
 *     `functools.partial` holds the rest). Each cell through its column's loader: None stays
 *     None, `unchanged` is left out (load_row) or kept (load_values), and any other cell
 *     becomes `loaders[i](cell)`. `codes[i]` names what that loader does (see cdc/rows.py);
 *     for the common text forms this file makes the very same value itself, and hands the
 *     cell to the loader whenever it is not sure (non-ASCII, unusual digits, invalid UTF-8),
 *     so the loader stays the definition.
 *
 * change_run(messages, start, items, relations, plans, row_change, raw_json, commit_lsn,
 *            position, kinds, no_columns) -> (stop, position, received, wal_end)
 *     Twin: the general path (xlog_data, the decoder, load_row, load_values and the Python
 *     around them; see cdc/runs.py, whose tests feed random streams both ways). From
 *     `messages[start]` on, each CopyData message that is an XLogData Insert, Update or Delete
 *     of a relation in `relations` whose plan in `plans` was bound for that very Relation,
 *     with every cell of its tuples 't', 'b' or 'n' and read as the loaders read it, becomes a
 *     `row_change` (kind from `kinds`: insert, update, delete) appended to `items`, numbered
 *     on from `position`. Stops at the first message that is anything else, or that fails in
 *     any way (the error is cleared: the general path reports it), and returns that index,
 *     the last position given, the highest data start and the last WAL end of those taken.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Must match cdc/rows.py. */
enum {
    CODE_CALL = 0,
    CODE_TEXT = 1,
    CODE_INT = 2,
    CODE_BOOL = 3,
    CODE_NUMERIC = 4,
    CODE_JSON = 5,
    CODE_TIMESTAMP = 6,
    CODE_TIMESTAMPTZ = 7,
};

static PyObject *str_columns; /* "columns", interned at module exec */

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint64_t
be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | (uint64_t)be32(p + 4);
}

/* --- tuple cells ------------------------------------------------------------------------- */

/* What the cell at `*pos` is: its kind byte ('t', 'b', 'n', 'u', or another), or one of these
   when the message ends first. A 't' or 'b' cell's text is `data[*text:*text + *length]`;
   `*pos` moves past any cell whose kind is returned. */
enum { CELL_NO_KIND = -1, CELL_NO_LENGTH = -2, CELL_NO_TEXT = -3 };

static inline int
next_cell(const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos, Py_ssize_t *text,
          Py_ssize_t *length)
{
    Py_ssize_t at = *pos;
    if (at >= size) {
        return CELL_NO_KIND;
    }
    unsigned char kind = data[at];
    if (kind == 't' || kind == 'b') {
        if (size - at < 5) {
            return CELL_NO_LENGTH;
        }
        uint32_t n = be32(data + at + 1);
        if ((uint64_t)n > (uint64_t)(size - at - 5)) {
            return CELL_NO_TEXT;
        }
        *text = at + 5;
        *length = (Py_ssize_t)n;
        *pos = at + 5 + (Py_ssize_t)n;
    }
    else if (kind == 'n' || kind == 'u') {
        *pos = at + 1;
    }
    return kind;
}

/* `ncols` cells from `*pos` on; advances `*pos`. New tuple, or NULL with the exception set.
   A tuple of bytes and None only is untracked by the garbage collector: it cannot be part of
   a cycle, and there is one per row. */
static PyObject *
cells_at(const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos_in, Py_ssize_t ncols,
         PyObject *unchanged)
{
    Py_ssize_t pos = *pos_in;
    int atomic = 1;
    PyObject *cells = PyTuple_New(ncols);
    if (cells == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        Py_ssize_t text = 0, length = 0;
        int kind = next_cell(data, size, &pos, &text, &length);
        PyObject *cell;
        if (kind == 't' || kind == 'b') {
            cell = PyBytes_FromStringAndSize((const char *)data + text, length);
            if (cell == NULL) {
                goto fail;
            }
        }
        else if (kind == 'n') {
            cell = Py_NewRef(Py_None);
        }
        else if (kind == 'u') {
            cell = Py_NewRef(unchanged);
            atomic = 0;
        }
        else if (kind == CELL_NO_KIND || (kind == CELL_NO_TEXT && i + 1 < ncols)) {
            /* As the Python loop sees a text running past the end: the next cell's kind is
               past the end, or, after the last cell, the position is. */
            PyErr_SetString(PyExc_IndexError, "tuple cell past the end of the message");
            goto fail;
        }
        else if (kind == CELL_NO_LENGTH) {
            PyErr_SetString(PyExc_IndexError, "tuple cell length past the end of the message");
            goto fail;
        }
        else if (kind == CELL_NO_TEXT) {
            PyErr_SetString(PyExc_ValueError, "tuple cell length is negative or past the end");
            goto fail;
        }
        else {
            char message[64];
            snprintf(message, sizeof message, "invalid tuple cell kind 0x%02x", kind);
            PyErr_SetString(PyExc_ValueError, message);
            goto fail;
        }
        PyTuple_SET_ITEM(cells, i, cell);
    }
    if (pos > size) { /* no cells, and a start past the end */
        PyErr_SetString(PyExc_ValueError, "tuple cell length is negative or past the end");
        goto fail;
    }
    if (atomic) {
        PyObject_GC_UnTrack(cells);
    }
    *pos_in = pos;
    return cells;

fail:
    Py_DECREF(cells);
    return NULL;
}

static PyObject *
read_cells(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_cells(buf, pos, ncols, unchanged) takes 4 arguments");
        return NULL;
    }
    PyObject *buf = args[0];
    if (!PyBytes_CheckExact(buf)) {
        PyErr_SetString(PyExc_TypeError, "read_cells: buf must be bytes");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t ncols = PyLong_AsSsize_t(args[2]);
    if (ncols == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (pos < 0 || ncols < 0) {
        PyErr_SetString(PyExc_ValueError, "read_cells: negative position or column count");
        return NULL;
    }
    PyObject *cells = cells_at((const unsigned char *)PyBytes_AS_STRING(buf),
                               PyBytes_GET_SIZE(buf), &pos, ncols, args[3]);
    if (cells == NULL) {
        return NULL;
    }
    return Py_BuildValue("(Nn)", cells, pos);
}

/* A new instance of the tuple subclass `cls` (a NamedTuple) holding `n` stolen references. */
static PyObject *
new_record(PyTypeObject *cls, Py_ssize_t n, PyObject **items)
{
    PyObject *record = cls->tp_alloc(cls, n);
    if (record == NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_DECREF(items[i]);
        }
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(record, i, items[i]);
    }
    return record;
}

static int
check_record_class(PyObject *cls, const char *function)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type) ||
        ((PyTypeObject *)cls)->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_Format(PyExc_TypeError, "%s: the class must be a plain tuple subclass", function);
        return -1;
    }
    return 0;
}

static PyObject *
read_insert(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "read_insert(buf, relations, insert, unchanged) takes 4 arguments");
        return NULL;
    }
    PyObject *buf = args[0], *relations = args[1], *cls = args[2], *unchanged = args[3];
    if (!PyBytes_CheckExact(buf) || !PyDict_CheckExact(relations)) {
        PyErr_SetString(PyExc_TypeError, "read_insert: buf must be bytes, relations a dict");
        return NULL;
    }
    if (check_record_class(cls, "read_insert") < 0) {
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(buf);
    Py_ssize_t size = PyBytes_GET_SIZE(buf);
    /* 'I', relation OID, 'N', column count */
    if (size < 8 || data[0] != 'I' || data[5] != 'N') {
        Py_RETURN_NONE;
    }
    PyObject *key = PyLong_FromUnsignedLong(be32(data + 1));
    if (key == NULL) {
        return NULL;
    }
    PyObject *relation = PyDict_GetItemWithError(relations, key); /* borrowed */
    Py_DECREF(key);
    if (relation == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_INCREF(relation);
    PyObject *columns = PyObject_GetAttr(relation, str_columns);
    if (columns == NULL) {
        PyErr_Clear();
        Py_DECREF(relation);
        Py_RETURN_NONE;
    }
    Py_ssize_t width = PyTuple_CheckExact(columns) ? PyTuple_GET_SIZE(columns) : -1;
    Py_DECREF(columns);
    Py_ssize_t ncols = ((Py_ssize_t)data[6] << 8) | data[7];
    Py_ssize_t pos = 8;
    PyObject *cells = NULL;
    if (ncols == width) {
        cells = cells_at(data, size, &pos, ncols, unchanged);
    }
    if (cells == NULL || pos != size) {
        PyErr_Clear();
        Py_XDECREF(cells);
        Py_DECREF(relation);
        Py_RETURN_NONE;
    }
    PyObject *items[2] = {relation, cells};
    return new_record((PyTypeObject *)cls, 2, items);
}

/* --- stream framing ---------------------------------------------------------------------- */

static PyObject *
xlog_data(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "xlog_data(buf, cls) takes 2 arguments");
        return NULL;
    }
    PyObject *buf = args[0], *cls = args[1];
    if (check_record_class(cls, "xlog_data") < 0) {
        return NULL;
    }
    if (!PyBytes_CheckExact(buf)) {
        Py_RETURN_NONE;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(buf);
    Py_ssize_t size = PyBytes_GET_SIZE(buf);
    if (size < 25 || data[0] != 'w') {
        Py_RETURN_NONE;
    }
    PyObject *items[4];
    items[0] = PyLong_FromUnsignedLongLong(be64(data + 1));
    items[1] = PyLong_FromUnsignedLongLong(be64(data + 9));
    items[2] = PyLong_FromLongLong((long long)be64(data + 17));
    items[3] = PyBytes_FromStringAndSize((const char *)data + 25, size - 25);
    if (!items[0] || !items[1] || !items[2] || !items[3]) {
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(items[i]);
        }
        return NULL;
    }
    return new_record((PyTypeObject *)cls, 4, items);
}

/* --- typed values ------------------------------------------------------------------------ */

static int
all_ascii(const char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((unsigned char)p[i] & 0x80) {
            return 0;
        }
    }
    return 1;
}

/* An exact str of `n` ASCII bytes from `p`, with `extra` more bytes left for the caller. */
static PyObject *
ascii_str(const char *p, Py_ssize_t n, Py_ssize_t extra)
{
    PyObject *text = PyUnicode_New(n + extra, 127);
    if (text != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(text), p, (size_t)n);
    }
    return text;
}

static PyObject *
raw_json_of(PyObject *raw_json, PyObject *text)
{
    if (text == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_CallOneArg(raw_json, text);
    Py_DECREF(text);
    /* A str subclass instance holds no reference but its class's: it cannot be part of a
       cycle, so the collector need not track it (nor the row dict holding it). */
    if (value != NULL && PyObject_IS_GC(value)) {
        PyObject_GC_UnTrack(value);
    }
    return value;
}

/* ISO text with its first space made a 'T' (timestamp, timestamptz). */
static PyObject *
iso_timestamp(const char *p, Py_ssize_t n, int utc_suffix)
{
    PyObject *text = ascii_str(p, n, utc_suffix ? 3 : 0);
    if (text == NULL) {
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    char *space = memchr(out, ' ', (size_t)n);
    if (space != NULL) {
        *space = 'T';
    }
    if (utc_suffix) {
        memcpy(out + n, ":00", 3);
    }
    return text;
}

/* The value of the cell text `p[:n]`, as `loader(bytes)` would give it. `cell` is that text as
   bytes when the caller has it, or NULL: the bytes are then made only if the loader is called. */
static PyObject *
load_text(const char *p, Py_ssize_t n, PyObject *cell, int code, PyObject *loader,
          PyObject *raw_json)
{
    switch (code) {
    case CODE_TEXT: {
        PyObject *text = PyUnicode_DecodeUTF8(p, n, NULL);
        if (text != NULL || !PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            return text;
        }
        PyErr_Clear(); /* the loader raises its own error */
        break;
    }
    case CODE_INT: {
        /* Canonical digits that fit: what int() gives; anything else is the loader's. */
        Py_ssize_t i = (n > 0 && p[0] == '-') ? 1 : 0;
        if (n - i >= 1 && n - i <= 18) {
            long long value = 0;
            for (; i < n; i++) {
                unsigned digit = (unsigned char)p[i] - '0';
                if (digit > 9) {
                    break;
                }
                value = value * 10 + digit;
            }
            if (i == n) {
                return PyLong_FromLongLong(p[0] == '-' ? -value : value);
            }
        }
        break;
    }
    case CODE_BOOL:
        if (n == 1 && (p[0] == 't' || p[0] == 'f')) {
            return Py_NewRef(p[0] == 't' ? Py_True : Py_False);
        }
        break;
    case CODE_NUMERIC:
        /* Starting with a digit or "-digit", it is neither NaN nor ±Infinity. */
        if (n >= 1 && ((p[0] >= '0' && p[0] <= '9') ||
                       (n >= 2 && p[0] == '-' && p[1] >= '0' && p[1] <= '9')) &&
            all_ascii(p, n)) {
            return raw_json_of(raw_json, ascii_str(p, n, 0));
        }
        break;
    case CODE_JSON: {
        PyObject *text = PyUnicode_DecodeUTF8(p, n, NULL);
        if (text != NULL) {
            return raw_json_of(raw_json, text);
        }
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            return NULL;
        }
        PyErr_Clear();
        break;
    }
    case CODE_TIMESTAMP:
        if (all_ascii(p, n)) {
            return iso_timestamp(p, n, 0);
        }
        break;
    case CODE_TIMESTAMPTZ:
        if (n >= 3 && memcmp(p + n - 3, "+00", 3) == 0 && all_ascii(p, n)) {
            return iso_timestamp(p, n, 1);
        }
        break;
    default:
        break;
    }
    if (cell != NULL) {
        return PyObject_CallOneArg(loader, cell);
    }
    PyObject *made = PyBytes_FromStringAndSize(p, n);
    if (made == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_CallOneArg(loader, made);
    Py_DECREF(made);
    return value;
}

/* Checks the shared arguments of load_row and load_values; a new reference to cells as a
   sequence with fast item access, or NULL. */
static PyObject *
check_plan(PyObject *cells, PyObject *codes, PyObject *loaders, Py_ssize_t *width)
{
    if (!PyBytes_CheckExact(codes) || !PyTuple_CheckExact(loaders) ||
        PyBytes_GET_SIZE(codes) != PyTuple_GET_SIZE(loaders)) {
        PyErr_SetString(PyExc_TypeError, "codes must be bytes and loaders a tuple of one length");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(cells, "cells must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    *width = PyTuple_GET_SIZE(loaders);
    if (PySequence_Fast_GET_SIZE(seq) != *width) {
        PyErr_Format(PyExc_ValueError, "%zd cells for %zd columns", PySequence_Fast_GET_SIZE(seq),
                     *width);
        Py_DECREF(seq);
        return NULL;
    }
    return seq;
}

static PyObject *
load_value(PyObject *cell, Py_ssize_t i, PyObject *codes, PyObject *loaders, PyObject *raw_json)
{
    if (cell == Py_None) {
        return Py_NewRef(Py_None);
    }
    PyObject *loader = PyTuple_GET_ITEM(loaders, i);
    if (!PyBytes_CheckExact(cell)) {
        return PyObject_CallOneArg(loader, cell);
    }
    return load_text(PyBytes_AS_STRING(cell), PyBytes_GET_SIZE(cell), cell,
                     (unsigned char)PyBytes_AS_STRING(codes)[i], loader, raw_json);
}

static PyObject *
load_row(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "load_row(names, codes, loaders, raw_json, unchanged, cells) takes 6 "
                        "arguments");
        return NULL;
    }
    PyObject *names = args[0], *codes = args[1], *loaders = args[2], *raw_json = args[3];
    PyObject *unchanged = args[4];
    Py_ssize_t width;
    PyObject *seq = check_plan(args[5], codes, loaders, &width);
    if (seq == NULL) {
        return NULL;
    }
    if (!PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != width) {
        PyErr_SetString(PyExc_TypeError, "names must be a tuple of one name per column");
        Py_DECREF(seq);
        return NULL;
    }
    PyObject **cells = PySequence_Fast_ITEMS(seq);
    PyObject *row = PyDict_New();
    if (row == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < width; i++) {
        if (cells[i] == unchanged) {
            continue;
        }
        PyObject *value = load_value(cells[i], i, codes, loaders, raw_json);
        if (value == NULL) {
            goto fail;
        }
        int failed = PyDict_SetItem(row, PyTuple_GET_ITEM(names, i), value);
        Py_DECREF(value);
        if (failed) {
            goto fail;
        }
    }
    Py_DECREF(seq);
    return row;

fail:
    Py_XDECREF(row);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
load_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "load_values(codes, loaders, raw_json, unchanged, cells) takes 5 arguments");
        return NULL;
    }
    PyObject *codes = args[0], *loaders = args[1], *raw_json = args[2], *unchanged = args[3];
    Py_ssize_t width;
    PyObject *seq = check_plan(args[4], codes, loaders, &width);
    if (seq == NULL) {
        return NULL;
    }
    PyObject **cells = PySequence_Fast_ITEMS(seq);
    PyObject *values = PyTuple_New(width);
    if (values == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < width; i++) {
        PyObject *value = cells[i] == unchanged
                              ? Py_NewRef(unchanged)
                              : load_value(cells[i], i, codes, loaders, raw_json);
        if (value == NULL) {
            Py_DECREF(values);
            Py_DECREF(seq);
            return NULL;
        }
        PyTuple_SET_ITEM(values, i, value);
    }
    Py_DECREF(seq);
    return values;
}

/* --- runs of row changes ---------------------------------------------------------------- */

/* A plan: (relation, names, codes, loaders, schema, table, key_indexes), one per bound
   relation (cdc.changes.ChangeBuilder.run_plans). */
enum { PLAN_RELATION, PLAN_NAMES, PLAN_CODES, PLAN_LOADERS, PLAN_SCHEMA, PLAN_TABLE, PLAN_KEYS,
       PLAN_SIZE };

/* The plan of relation `oid` (a new reference), or NULL, no error set, when there is none to
   use: the relation is unknown, or the plan was bound for another Relation message. */
static PyObject *
plan_for(PyObject *relations, PyObject *plans, uint32_t oid)
{
    PyObject *key = PyLong_FromUnsignedLong(oid);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *relation = PyDict_GetItemWithError(relations, key); /* borrowed */
    PyObject *plan = relation == NULL ? NULL : PyDict_GetItemWithError(plans, key);
    Py_DECREF(key);
    if (plan == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != PLAN_SIZE ||
        PyTuple_GET_ITEM(plan, PLAN_RELATION) != relation) {
        return NULL;
    }
    PyObject *names = PyTuple_GET_ITEM(plan, PLAN_NAMES);
    PyObject *codes = PyTuple_GET_ITEM(plan, PLAN_CODES);
    PyObject *loaders = PyTuple_GET_ITEM(plan, PLAN_LOADERS);
    PyObject *keys = PyTuple_GET_ITEM(plan, PLAN_KEYS);
    if (!PyTuple_CheckExact(names) || !PyBytes_CheckExact(codes) || !PyTuple_CheckExact(loaders) ||
        !PyTuple_CheckExact(keys) || PyTuple_GET_SIZE(names) != PyBytes_GET_SIZE(codes) ||
        PyTuple_GET_SIZE(names) != PyTuple_GET_SIZE(loaders)) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        PyObject *index = PyTuple_GET_ITEM(keys, k);
        Py_ssize_t i = PyLong_CheckExact(index) ? PyLong_AsSsize_t(index) : -1;
        if (i < 0 || i >= PyTuple_GET_SIZE(names)) {
            PyErr_Clear();
            return NULL;
        }
    }
    return Py_NewRef(plan);
}

/* The TupleData at `data[*pos:]` ('t', 'b' and 'n' cells only, one per column) loaded into
   `values` (new references), as load_values would load read_cells' cells; advances `*pos`.
   0, or -1 for anything else or any failure (the error, if one is set, is the caller's to
   clear; `values` then holds nothing). */
static int
load_tuple(const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos, PyObject *plan,
           PyObject *raw_json, PyObject **values)
{
    PyObject *loaders = PyTuple_GET_ITEM(plan, PLAN_LOADERS);
    const unsigned char *codes =
        (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(plan, PLAN_CODES));
    Py_ssize_t width = PyTuple_GET_SIZE(loaders), at = *pos, i = 0;
    if (size - at < 2 || (((Py_ssize_t)data[at] << 8) | data[at + 1]) != width) {
        return -1;
    }
    at += 2;
    for (; i < width; i++) {
        Py_ssize_t text = 0, length = 0;
        int kind = next_cell(data, size, &at, &text, &length);
        if (kind == 't' || kind == 'b') {
            values[i] = load_text((const char *)data + text, length, NULL, codes[i],
                                  PyTuple_GET_ITEM(loaders, i), raw_json);
            if (values[i] == NULL) {
                break;
            }
        }
        else if (kind == 'n') {
            values[i] = Py_NewRef(Py_None);
        }
        else {
            break; /* 'u', unknown or cut short: the general path's to judge */
        }
    }
    if (i < width) {
        while (i-- > 0) {
            Py_DECREF(values[i]);
        }
        return -1;
    }
    *pos = at;
    return 0;
}

/* A row from loaded `values`: every column, or (`keys`) the replica identity's only.
   Takes the references of `values` either way; NULL with an exception set on failure. */
static PyObject *
row_of(PyObject *plan, PyObject **values, int keys)
{
    PyObject *names = PyTuple_GET_ITEM(plan, PLAN_NAMES);
    PyObject *key_indexes = PyTuple_GET_ITEM(plan, PLAN_KEYS);
    Py_ssize_t width = PyTuple_GET_SIZE(names);
    Py_ssize_t count = keys ? PyTuple_GET_SIZE(key_indexes) : width;
    PyObject *row = PyDict_New();
    for (Py_ssize_t k = 0; row != NULL && k < count; k++) {
        Py_ssize_t i = keys ? PyLong_AsSsize_t(PyTuple_GET_ITEM(key_indexes, k)) : k;
        if (PyDict_SetItem(row, PyTuple_GET_ITEM(names, i), values[i]) < 0) {
            Py_CLEAR(row);
        }
    }
    for (Py_ssize_t i = 0; i < width; i++) {
        Py_DECREF(values[i]);
    }
    return row;
}

/* The row of the TupleData at `data[*pos:]` (`keys`: its replica identity's columns), or
   NULL as load_tuple fails (an error set is the caller's to clear). */
static PyObject *
tuple_row(const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos, PyObject *plan,
          PyObject *raw_json, int keys)
{
    PyObject *stack[32], **values = stack;
    Py_ssize_t width = PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, PLAN_NAMES));
    if (width > 32) {
        values = PyMem_New(PyObject *, (size_t)width);
        if (values == NULL) {
            return PyErr_NoMemory();
        }
    }
    PyObject *row = NULL;
    if (load_tuple(data, size, pos, plan, raw_json, values) == 0) {
        row = row_of(plan, values, keys);
    }
    if (values != stack) {
        PyMem_Free(values);
    }
    return row;
}

/* One Insert, Update or Delete message body (`data[:size]`, past the XLogData header) as the
   general path types it: *kind (0, 1, 2), *new and *old rows (None when absent). 0 when
   taken; -1 when it is not this function's (an error, if set, is the caller's to clear). */
static int
change_of(const unsigned char *data, Py_ssize_t size, PyObject *plan, PyObject *raw_json,
          int *kind, PyObject **new, PyObject **old)
{
    *new = *old = NULL;
    Py_ssize_t pos = 5; /* past the kind byte and the relation OID */
    *kind = data[0] == 'I' ? 0 : data[0] == 'U' ? 1 : 2;
    if (pos < size && (data[pos] == 'K' || data[pos] == 'O') && *kind != 0) {
        int keys = data[pos] == 'K';
        pos += 1;
        *old = tuple_row(data, size, &pos, plan, raw_json, keys);
        if (*old == NULL) {
            return -1;
        }
    }
    else if (*kind == 2) {
        return -1; /* a Delete always names its old row */
    }
    if (*kind != 2) {
        if (pos >= size || data[pos] != 'N') {
            Py_CLEAR(*old);
            return -1;
        }
        pos += 1;
        *new = tuple_row(data, size, &pos, plan, raw_json, 0);
        if (*new == NULL) {
            Py_CLEAR(*old);
            return -1;
        }
    }
    if (pos != size) {
        Py_CLEAR(*old);
        Py_CLEAR(*new);
        return -1;
    }
    if (*new == NULL) {
        *new = Py_NewRef(Py_None);
    }
    if (*old == NULL) {
        *old = Py_NewRef(Py_None);
    }
    return 0;
}

static PyObject *
change_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError,
                        "change_run(messages, start, items, relations, plans, row_change, "
                        "raw_json, commit_lsn, position, kinds, no_columns) takes 11 arguments");
        return NULL;
    }
    PyObject *messages = args[0], *items = args[2], *relations = args[3], *plans = args[4];
    PyObject *cls = args[5], *raw_json = args[6], *commit_lsn = args[7], *kinds = args[9];
    PyObject *no_columns = args[10];
    if (!PyList_CheckExact(messages) || !PyList_CheckExact(items) ||
        !PyDict_CheckExact(relations) || !PyDict_CheckExact(plans) ||
        !PyLong_CheckExact(commit_lsn) || !PyTuple_CheckExact(kinds) ||
        PyTuple_GET_SIZE(kinds) != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "change_run: messages and items must be lists, relations and plans dicts, "
                        "commit_lsn an int, kinds a tuple of three names");
        return NULL;
    }
    if (check_record_class(cls, "change_run") < 0) {
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    long long position = PyLong_AsLongLong(args[8]);
    if ((i == -1 || position == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "change_run: negative start");
        return NULL;
    }
    unsigned long long received = 0, wal_end = 0;
    PyObject *plan = NULL;
    uint32_t plan_oid = 0;
    for (; i < PyList_GET_SIZE(messages); i++) {
        PyObject *message = PyList_GET_ITEM(messages, i); /* borrowed: the list is not changed */
        if (!PyBytes_CheckExact(message)) {
            break;
        }
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(message);
        Py_ssize_t size = PyBytes_GET_SIZE(message);
        /* XLogData ('w', data start, WAL end, send time) around 'I', 'U' or 'D' and an OID */
        if (size < 25 + 5 || data[0] != 'w' ||
            (data[25] != 'I' && data[25] != 'U' && data[25] != 'D')) {
            break;
        }
        uint32_t oid = be32(data + 26);
        if (plan == NULL || oid != plan_oid) {
            Py_CLEAR(plan);
            plan = plan_for(relations, plans, oid);
            if (plan == NULL) {
                break;
            }
            plan_oid = oid;
        }
        int kind;
        PyObject *new, *old;
        Py_INCREF(message); /* a loader runs Python code: hold what `data` points into */
        int taken = change_of(data + 25, size - 25, plan, raw_json, &kind, &new, &old);
        Py_DECREF(message);
        if (taken < 0) {
            PyErr_Clear(); /* the general path reports it, as a ProtocolError */
            break;
        }
        PyObject *fields[8] = {
            Py_NewRef(commit_lsn),
            PyLong_FromLongLong(position + 1),
            Py_NewRef(PyTuple_GET_ITEM(plan, PLAN_SCHEMA)),
            Py_NewRef(PyTuple_GET_ITEM(plan, PLAN_TABLE)),
            Py_NewRef(PyTuple_GET_ITEM(kinds, kind)),
            new,
            old,
            Py_NewRef(no_columns),
        };
        if (fields[1] == NULL) {
            for (int f = 0; f < 8; f++) {
                Py_XDECREF(fields[f]);
            }
            goto fail;
        }
        PyObject *change = new_record((PyTypeObject *)cls, 8, fields);
        if (change == NULL) {
            goto fail;
        }
        int failed = PyList_Append(items, change);
        Py_DECREF(change);
        if (failed) {
            goto fail;
        }
        position += 1;
        unsigned long long data_start = be64(data + 1);
        if (data_start > received) {
            received = data_start;
        }
        wal_end = be64(data + 9);
    }
    Py_XDECREF(plan);
    return Py_BuildValue("(nLKK)", i, position, received, wal_end);

fail:
    Py_XDECREF(plan);
    return NULL;
}

/* --- module ------------------------------------------------------------------------------ */

static PyMethodDef speedups_methods[] = {
    {"read_cells", (PyCFunction)(void (*)(void))read_cells, METH_FASTCALL,
     "read_cells(buf, pos, ncols, unchanged) -> (cells, end): pgoutput TupleData cells."},
    {"read_insert", (PyCFunction)(void (*)(void))read_insert, METH_FASTCALL,
     "read_insert(buf, relations, insert, unchanged) -> Insert | None: a well-formed Insert."},
    {"xlog_data", (PyCFunction)(void (*)(void))xlog_data, METH_FASTCALL,
     "xlog_data(buf, cls) -> XLogData | None: a CopyData 'w' message."},
    {"load_row", (PyCFunction)(void (*)(void))load_row, METH_FASTCALL,
     "load_row(names, codes, loaders, raw_json, unchanged, cells) -> dict: a typed row."},
    {"load_values", (PyCFunction)(void (*)(void))load_values, METH_FASTCALL,
     "load_values(codes, loaders, raw_json, unchanged, cells) -> tuple: typed values."},
    {"change_run", (PyCFunction)(void (*)(void))change_run, METH_FASTCALL,
     "change_run(messages, start, items, relations, plans, row_change, raw_json, commit_lsn, "
     "position, kinds, no_columns) -> (stop, position, received, wal_end): a run of row "
     "changes."},
    {NULL, NULL, 0, NULL},
};

static int
speedups_exec(PyObject *module)
{
    if (str_columns == NULL) {
        str_columns = PyUnicode_InternFromString("columns");
        if (str_columns == NULL) {
            return -1;
        }
    }
    return 0;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cdc._speedups",
    .m_doc = "Optional C versions of the per-change loops of cdc.replication, cdc.decoder and "
             "cdc.changes.",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
