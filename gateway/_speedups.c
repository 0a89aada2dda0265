/* A history entry of a row change in C: one call per change kept (gateway/entries.py).
 *
 * Optional. Without it (no compiler) `gateway.entries.change_entry_py` makes the same bytes;
 * tests/test_entries.py fuzzes the two against each other.
 *
 * raw_json_mask(row: dict | None, raw_json: type) -> int
 *     Twin: gateway.entries.raw_json_mask_py. Which of a typed row's values are `raw_json`,
 *     as bits by position (bit i: the i-th value); 0 for None; -1 when bits cannot say it
 *     all: not an exact dict, more than 63 values, or a value that is not exactly str, int,
 *     float, bool, None or `raw_json` (a list or dict may hold RawJson inside).
 *
 * change_entry(event, now: float, micros: int, context: int, codec) -> bytes
 *     Twin: gateway.entries.change_entry_py. `codec` is (raw_json, dumps, tagged_dumps).
 *     The entry of a ChangeEvent: the header (commit LSN, position, `now`, `micros`, the
 *     transaction id, `context`, then the masks of the new and the old row, or TAGGED and 0
 *     when either mask is -1), little-endian as struct "<QQdqQIQQ", followed by
 *     `dumps(event[5:11])`, or `tagged_dumps(event[5:11])` with TAGGED.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The fields of gateway.events.ChangeEvent used here. */
enum { EVENT_KEY = 1, EVENT_TYPE = 5, EVENT_NEW = 6, EVENT_OLD = 7, EVENT_BODY_END = 11,
       EVENT_XID = 11, EVENT_FIELDS = 12 };
#define HEADER_SIZE 60
#define TAGGED UINT64_MAX

/* The mask of `row`, or -1 (see raw_json_mask above). */
static int64_t
mask_of(PyObject *row, PyTypeObject *raw_json)
{
    if (row == Py_None) {
        return 0;
    }
    if (!PyDict_CheckExact(row) || PyDict_GET_SIZE(row) > 63) {
        return -1;
    }
    uint64_t mask = 0;
    Py_ssize_t pos = 0;
    int i = 0;
    PyObject *key, *value;
    while (PyDict_Next(row, &pos, &key, &value)) {
        PyTypeObject *type = Py_TYPE(value);
        if (type == raw_json) {
            mask |= (uint64_t)1 << i;
        }
        else if (!(type == &PyUnicode_Type || type == &PyLong_Type || value == Py_None ||
                   type == &PyBool_Type || type == &PyFloat_Type)) {
            return -1;
        }
        i++;
    }
    return (int64_t)mask;
}

static PyObject *
raw_json_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "raw_json_mask(row, raw_json): a row and a type");
        return NULL;
    }
    return PyLong_FromLongLong(mask_of(args[0], (PyTypeObject *)args[1]));
}

static void
put64(unsigned char *p, uint64_t value)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(value >> (8 * i));
    }
}

/* `value` as a u64 the way struct's "Q" takes it: an int from 0 to 2**64 - 1. */
static int
u64_of(PyObject *value, uint64_t *out)
{
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "change_entry: a key or transaction id is not an int");
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(value);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *
change_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "change_entry(event, now, micros, context, codec) takes 5 arguments");
        return NULL;
    }
    PyObject *event = args[0], *codec = args[4];
    if (!PyTuple_Check(event) || PyTuple_GET_SIZE(event) != EVENT_FIELDS ||
        !PyTuple_CheckExact(codec) || PyTuple_GET_SIZE(codec) != 3 ||
        !PyType_Check(PyTuple_GET_ITEM(codec, 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "change_entry: a ChangeEvent and (raw_json, dumps, tagged_dumps)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[1]);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t micros = PyLong_AsLongLong(args[2]);
    if (micros == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long context = PyLong_AsUnsignedLong(args[3]);
    if (context == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (context > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "change_entry: context out of range");
        return NULL;
    }
    PyObject *key = PyTuple_GET_ITEM(event, EVENT_KEY);
    uint64_t lsn, position, xid;
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "change_entry: the key is not a pair");
        return NULL;
    }
    if (u64_of(PyTuple_GET_ITEM(key, 0), &lsn) < 0 ||
        u64_of(PyTuple_GET_ITEM(key, 1), &position) < 0 ||
        u64_of(PyTuple_GET_ITEM(event, EVENT_XID), &xid) < 0) {
        return NULL;
    }
    PyTypeObject *raw_json = (PyTypeObject *)PyTuple_GET_ITEM(codec, 0);
    int64_t new_mask = mask_of(PyTuple_GET_ITEM(event, EVENT_NEW), raw_json);
    int64_t old_mask = mask_of(PyTuple_GET_ITEM(event, EVENT_OLD), raw_json);
    int tagged = new_mask < 0 || old_mask < 0;
    PyObject *body = PyTuple_GetSlice(event, EVENT_TYPE, EVENT_BODY_END);
    if (body == NULL) {
        return NULL;
    }
    PyObject *json = PyObject_CallOneArg(PyTuple_GET_ITEM(codec, tagged ? 2 : 1), body);
    Py_DECREF(body);
    if (json == NULL) {
        return NULL;
    }
    if (!PyBytes_CheckExact(json)) {
        Py_DECREF(json);
        PyErr_SetString(PyExc_TypeError, "change_entry: dumps did not return bytes");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(json);
    PyObject *entry = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + size);
    if (entry == NULL) {
        Py_DECREF(json);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(entry);
    uint64_t now_bits;
    memcpy(&now_bits, &now, 8);
    put64(p, lsn);
    put64(p + 8, position);
    put64(p + 16, now_bits);
    put64(p + 24, (uint64_t)micros);
    put64(p + 32, xid);
    for (int i = 0; i < 4; i++) {
        p[40 + i] = (unsigned char)(context >> (8 * i));
    }
    put64(p + 44, tagged ? TAGGED : (uint64_t)new_mask);
    put64(p + 52, tagged ? 0 : (uint64_t)old_mask);
    memcpy(p + HEADER_SIZE, PyBytes_AS_STRING(json), size);
    Py_DECREF(json);
    return entry;
}

static PyMethodDef speedups_methods[] = {
    {"raw_json_mask", (PyCFunction)(void (*)(void))raw_json_mask, METH_FASTCALL,
     "raw_json_mask(row, raw_json) -> int: which values are RawJson, as bits; -1: not only "
     "plain values."},
    {"change_entry", (PyCFunction)(void (*)(void))change_entry, METH_FASTCALL,
     "change_entry(event, now, micros, context, codec) -> bytes: a change's history entry."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway._speedups",
    .m_doc = "A history entry of a row change in C (optional; see gateway/_speedups.c).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
