/* The gateway's per-event work in C: a change's history entry (gateway/entries.py), keeping
 * it (gateway/history.py) and handing a reader item's events to the hubs (gateway/hubs.py).
 *
 * Optional. Without it (no compiler) each function's Python twin, named below, runs instead
 * and stays the definition: tests/test_entries.py, tests/test_history_append.py and
 * tests/test_hubs_publish.py run random inputs through both and require the same result.
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
 *
 * append_change(state, event) -> None
 *     Twin: gateway.history.MemoryHistory._append, bound by the history as its `append` with
 *     `state` = (history, ChangeEvent, codec, CHUNK, ENTRY_OVERHEAD). A ChangeEvent's entry is
 *     written and kept here, with the history's own attributes; what happens once per
 *     transaction, history, chunk or bound (`_change_context`, `_new_kept`, `_join_order`,
 *     `seal`, `_expire`, `_evict_node_wide`) is the history's Python, called from here. Any
 *     other event goes to `_append` whole.
 *
 * publish_events(state, events) -> None
 *     Twin: gateway.hubs.HubRegistry._publish_all, bound by the registry as its `publish_all`
 *     with `state` = (registry, tally, append, hubs, ChangeEvent, AccessRevoked): each
 *     AccessRevoked goes to `registry.revoke`; every other event is counted (`tally.value`,
 *     once per call), kept (`append`, the history's) and delivered by the hub of its
 *     organization (`hubs[org].deliver_live`), or by every hub when it has none (TRUNCATE).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The fields of gateway.events.ChangeEvent used here. */
enum { EVENT_ORG = 0, EVENT_KEY = 1, EVENT_EPOCH = 2, EVENT_COMMIT_TIME = 3, EVENT_TABLE = 4,
       EVENT_TYPE = 5, EVENT_NEW = 6, EVENT_OLD = 7, EVENT_BODY_END = 11,
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

/* The entry of `event` (a ChangeEvent: checked by the callers) with `codec` (checked too). */
static PyObject *
make_entry(PyObject *event, double now, int64_t micros, unsigned long context, PyObject *codec)
{
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
    return make_entry(event, now, micros, context, codec);
}

/* The attribute and method names append_change uses, interned when the module loads. */
static PyObject *s_append, *s_shared, *s_orgs, *s_new_kept, *s_clock, *s_last_change,
    *s_change_context, *s_length, *s_join_order, *s_newest, *s_seal, *s_size, *s_bytes,
    *s_max_events, *s_expire, *s_max_total_events, *s_max_total_bytes, *s_evict_node_wide,
    *s_position;

/* The outcome of a call whose result is not used: -1 when it raised, else 0. */
static int
discard(PyObject *result)
{
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* The history's attribute `name`, from its `__dict__` (`fields`): a borrowed reference. */
static PyObject *
field(PyObject *fields, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(fields, name);
    if (value == NULL && !PyErr_Occurred()) {
        PyErr_SetObject(PyExc_AttributeError, name);
    }
    return value;
}

/* `obj.name` (an attribute, or with `fields` an entry of a `__dict__`) as a C integer. */
static int
long_attr(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *value = PyDict_CheckExact(obj) ? Py_XNewRef(field(obj, name))
                                             : PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* `obj.name = value` for a C integer (`obj` an object or a `__dict__`). */
static int
set_long_attr(PyObject *obj, PyObject *name, long long value)
{
    PyObject *number = PyLong_FromLongLong(value);
    if (number == NULL) {
        return -1;
    }
    int result = PyDict_CheckExact(obj) ? PyDict_SetItem(obj, name, number)
                                        : PyObject_SetAttr(obj, name, number);
    Py_DECREF(number);
    return result;
}

/* The history of the event's organization (its `_shared` one for None), made if new. */
static PyObject *
kept_of(PyObject *history, PyObject *fields, PyObject *org)
{
    if (org == Py_None) {
        return Py_XNewRef(field(fields, s_shared));
    }
    PyObject *orgs = field(fields, s_orgs);
    if (orgs == NULL) {
        return NULL;
    }
    PyObject *kept = PyDict_CheckExact(orgs) ? PyDict_GetItemWithError(orgs, org) : NULL;
    Py_XINCREF(kept);
    if (kept == NULL && !PyErr_Occurred()) {
        kept = PyObject_CallMethodOneArg(history, s_new_kept, org);
    }
    return kept;
}

/* The entry of `event`, kept at `now`: the commit time in µs and the context id from the
 * last change kept when the event shares its transaction, table and epoch. */
static PyObject *
entry_of(PyObject *history, PyObject *fields, PyObject *event, double now, PyObject *codec)
{
    PyObject *commit_time = PyTuple_GET_ITEM(event, EVENT_COMMIT_TIME);
    PyObject *table = PyTuple_GET_ITEM(event, EVENT_TABLE);
    PyObject *epoch = PyTuple_GET_ITEM(event, EVENT_EPOCH);
    PyObject *last = Py_XNewRef(field(fields, s_last_change));
    if (last == NULL) {
        return NULL;
    }
    int same = PyTuple_CheckExact(last) && PyTuple_GET_SIZE(last) == 5 &&
               PyTuple_GET_ITEM(last, 0) == commit_time && PyTuple_GET_ITEM(last, 1) == table;
    if (same && PyTuple_GET_ITEM(last, 2) != epoch) {
        same = PyObject_RichCompareBool(PyTuple_GET_ITEM(last, 2), epoch, Py_EQ);
    }
    PyObject *found = last;  /* (…, micros, context) or (micros, context) */
    Py_ssize_t at = 3;
    if (same == 0) {
        Py_DECREF(last);
        found = PyObject_CallMethodObjArgs(history, s_change_context, commit_time, table, epoch,
                                           NULL);
        at = 0;
        if (found != NULL && (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 2)) {
            Py_DECREF(found);
            PyErr_SetString(PyExc_TypeError, "append_change: _change_context is not a pair");
            return NULL;
        }
    }
    else if (same < 0) {
        Py_DECREF(last);
        return NULL;
    }
    if (found == NULL) {
        return NULL;
    }
    PyObject *entry = NULL;
    int64_t micros = PyLong_AsLongLong(PyTuple_GET_ITEM(found, at));
    unsigned long context = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(found, at + 1));
    if (!PyErr_Occurred()) {
        entry = make_entry(event, now, micros, context, codec);
    }
    Py_DECREF(found);
    return entry;
}

/* `entry` (of the event at `key`, kept at `now`) into `kept`, with the history's counts,
 * bounds and position, as the end of MemoryHistory._append does it. */
static int
keep(PyObject *history, PyObject *fields, PyObject *kept, PyObject *key, PyObject *entry,
     PyObject *now, Py_ssize_t chunk, Py_ssize_t overhead)
{
    long long length, size, nbytes, max_events, max_total_events, max_total_bytes;
    if (long_attr(kept, s_length, &length) < 0) {
        return -1;
    }
    if (length == 0 &&
        discard(PyObject_CallMethodObjArgs(history, s_join_order, key, kept, NULL)) < 0) {
        return -1;
    }
    PyObject *newest = PyObject_GetAttr(kept, s_newest);
    if (newest == NULL) {
        return -1;
    }
    if (!PyList_CheckExact(newest)) {
        Py_DECREF(newest);
        PyErr_SetString(PyExc_TypeError, "append_change: a history's newest is not a list");
        return -1;
    }
    int appended = PyList_Append(newest, entry);
    Py_ssize_t held = PyList_GET_SIZE(newest);
    Py_DECREF(newest);
    if (appended < 0) {
        return -1;
    }
    if (held == chunk && discard(PyObject_CallMethodNoArgs(kept, s_seal)) < 0) {
        return -1;
    }
    if (set_long_attr(kept, s_length, length + 1) < 0 || long_attr(fields, s_size, &size) < 0 ||
        set_long_attr(fields, s_size, size + 1) < 0 ||
        long_attr(fields, s_bytes, &nbytes) < 0 ||
        set_long_attr(fields, s_bytes, nbytes + PyBytes_GET_SIZE(entry) + overhead) < 0 ||
        long_attr(fields, s_max_events, &max_events) < 0) {
        return -1;
    }
    if (length + 1 > max_events &&
        discard(PyObject_CallMethodObjArgs(history, s_expire, kept, now, NULL)) < 0) {
        return -1;
    }
    if (long_attr(fields, s_max_total_events, &max_total_events) < 0 ||
        long_attr(fields, s_max_total_bytes, &max_total_bytes) < 0) {
        return -1;
    }
    /* The counts as this entry left them, before `_expire` took any out: at worst the
     * eviction is called with nothing to do, as it checks both bounds again itself. */
    int over = size + 1 > max_total_events ||
               nbytes + PyBytes_GET_SIZE(entry) + overhead > max_total_bytes;
    if (over && discard(PyObject_CallMethodNoArgs(history, s_evict_node_wide)) < 0) {
        return -1;
    }
    PyObject *position = field(fields, s_position);
    if (position == NULL) {
        return -1;
    }
    int later = PyObject_RichCompareBool(key, position, Py_GT);
    if (later > 0) {
        return PyDict_SetItem(fields, s_position, key);
    }
    return later;
}

static PyObject *
append_change(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 5 ||
        !PyType_Check(PyTuple_GET_ITEM(args[0], 1)) ||
        !PyTuple_CheckExact(PyTuple_GET_ITEM(args[0], 2)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(args[0], 2)) != 3 ||
        !PyType_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(args[0], 2), 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "append_change((history, ChangeEvent, codec, chunk, overhead), event)");
        return NULL;
    }
    PyObject *state = args[0], *event = args[1];
    PyObject *history = PyTuple_GET_ITEM(state, 0), *codec = PyTuple_GET_ITEM(state, 2);
    if ((PyObject *)Py_TYPE(event) != PyTuple_GET_ITEM(state, 1) ||
        PyTuple_GET_SIZE(event) != EVENT_FIELDS) {
        return PyObject_CallMethodOneArg(history, s_append, event);
    }
    Py_ssize_t chunk = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 3));
    Py_ssize_t overhead = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 4));
    if ((chunk == -1 || overhead == -1) && PyErr_Occurred()) {
        return NULL;
    }
    /* The history's own attributes are read and written in its __dict__: no type lookup. */
    PyObject *fields = PyObject_GenericGetDict(history, NULL);
    if (fields == NULL) {
        return NULL;
    }
    PyObject *kept = NULL, *now = NULL, *entry = NULL, *result = NULL;
    if (!PyDict_CheckExact(fields)) {
        PyErr_SetString(PyExc_TypeError, "append_change: the history's __dict__ is not a dict");
        goto done;
    }
    kept = kept_of(history, fields, PyTuple_GET_ITEM(event, EVENT_ORG));
    if (kept == NULL) {
        goto done;
    }
    PyObject *clock = field(fields, s_clock);
    if (clock == NULL || (now = PyObject_CallNoArgs(clock)) == NULL) {
        goto done;
    }
    double seconds = PyFloat_AsDouble(now);
    if (seconds == -1.0 && PyErr_Occurred()) {
        goto done;
    }
    entry = entry_of(history, fields, event, seconds, codec);
    PyObject *key = PyTuple_GET_ITEM(event, EVENT_KEY);
    if (entry == NULL || keep(history, fields, kept, key, entry, now, chunk, overhead) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(fields);
    Py_XDECREF(kept);
    Py_XDECREF(now);
    Py_XDECREF(entry);
    return result;
}

/* The names publish_events uses, interned when the module loads. */
static PyObject *s_value, *s_revoke, *s_deliver_live, *s_organization_id;

/* tally.value += counted, keeping an exception already set (a callback's) in place of any
 * of its own. */
static int
add_to_tally(PyObject *tally, Py_ssize_t counted)
{
    if (counted == 0) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int done = -1;
    PyObject *before = PyObject_GetAttr(tally, s_value);
    if (before != NULL) {
        PyObject *more = PyLong_FromSsize_t(counted);
        PyObject *after = more == NULL ? NULL : PyNumber_Add(before, more);
        done = after == NULL ? -1 : PyObject_SetAttr(tally, s_value, after);
        Py_XDECREF(more);
        Py_XDECREF(after);
        Py_DECREF(before);
    }
    if (type != NULL) {
        PyErr_Clear();
        PyErr_Restore(type, value, traceback);
        return -1;
    }
    return done;
}

/* `hub.deliver_live(event)` for the hub of `org` (a borrowed reference), if this node has
 * one, or for every hub when `org` is None. */
static int
deliver(PyObject *hubs, PyObject *org, PyObject *event)
{
    if (org != Py_None) {
        PyObject *hub = PyDict_GetItemWithError(hubs, org);
        if (hub == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        Py_INCREF(hub);
        int done = discard(PyObject_CallMethodOneArg(hub, s_deliver_live, event));
        Py_DECREF(hub);
        return done;
    }
    PyObject *every = PyDict_Values(hubs); /* a copy: a delivery may change the dict */
    if (every == NULL) {
        return -1;
    }
    int done = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(every) && done == 0; i++) {
        done = discard(PyObject_CallMethodOneArg(PyList_GET_ITEM(every, i), s_deliver_live, event));
    }
    Py_DECREF(every);
    return done;
}

static PyObject *
publish_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *state = nargs == 2 ? args[0] : NULL;
    if (state == NULL || !PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 6 ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(state, 3)) ||
        !PyType_Check(PyTuple_GET_ITEM(state, 4)) || !PyType_Check(PyTuple_GET_ITEM(state, 5))) {
        PyErr_SetString(PyExc_TypeError,
                        "publish_events((registry, tally, append, hubs, ChangeEvent, "
                        "AccessRevoked), events)");
        return NULL;
    }
    PyObject *registry = PyTuple_GET_ITEM(state, 0), *tally = PyTuple_GET_ITEM(state, 1);
    PyObject *append = PyTuple_GET_ITEM(state, 2), *hubs = PyTuple_GET_ITEM(state, 3);
    PyTypeObject *change_event = (PyTypeObject *)PyTuple_GET_ITEM(state, 4);
    PyTypeObject *access_revoked = (PyTypeObject *)PyTuple_GET_ITEM(state, 5);
    PyObject *events = PySequence_Fast(args[1], "publish_events: events must be iterable");
    if (events == NULL) {
        return NULL;
    }
    Py_ssize_t counted = 0;
    int failed = 0;
    /* A list may change under a callback: its size is read again, each event held. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(events) && !failed; i++) {
        PyObject *event = Py_NewRef(PySequence_Fast_GET_ITEM(events, i));
        int revoked = PyObject_TypeCheck(event, access_revoked);
        PyObject *done;
        if (revoked) {
            done = PyObject_CallMethodOneArg(registry, s_revoke, event);
        }
        else {
            counted++;
            done = PyObject_CallOneArg(append, event);
        }
        failed = done == NULL;
        Py_XDECREF(done);
        if (!failed && !revoked) {
            if (Py_TYPE(event) == change_event && PyTuple_GET_SIZE(event) > 0) {
                failed = deliver(hubs, PyTuple_GET_ITEM(event, 0), event) < 0;
            }
            else {
                PyObject *org = PyObject_GetAttr(event, s_organization_id);
                failed = org == NULL || deliver(hubs, org, event) < 0;
                Py_XDECREF(org);
            }
        }
        Py_DECREF(event);
    }
    Py_DECREF(events);
    if (add_to_tally(tally, counted) < 0 || failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"raw_json_mask", (PyCFunction)(void (*)(void))raw_json_mask, METH_FASTCALL,
     "raw_json_mask(row, raw_json) -> int: which values are RawJson, as bits; -1: not only "
     "plain values."},
    {"change_entry", (PyCFunction)(void (*)(void))change_entry, METH_FASTCALL,
     "change_entry(event, now, micros, context, codec) -> bytes: a change's history entry."},
    {"append_change", (PyCFunction)(void (*)(void))append_change, METH_FASTCALL,
     "append_change(state, event): MemoryHistory.append, bound by the history."},
    {"publish_events", (PyCFunction)(void (*)(void))publish_events, METH_FASTCALL,
     "publish_events(state, events): HubRegistry.publish_all, bound by the registry."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway._speedups",
    .m_doc = "The gateway's per-event work in C (optional; see gateway/_speedups.c).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&s_append, "_append"}, {&s_shared, "_shared"}, {&s_orgs, "_orgs"},
        {&s_new_kept, "_new_kept"}, {&s_clock, "_clock"}, {&s_last_change, "_last_change"},
        {&s_change_context, "_change_context"}, {&s_length, "length"},
        {&s_join_order, "_join_order"}, {&s_newest, "newest"}, {&s_seal, "seal"},
        {&s_size, "_size"}, {&s_bytes, "_bytes"}, {&s_max_events, "max_events"},
        {&s_expire, "_expire"}, {&s_max_total_events, "max_total_events"},
        {&s_max_total_bytes, "max_total_bytes"}, {&s_evict_node_wide, "_evict_node_wide"},
        {&s_position, "position"}, {&s_value, "value"}, {&s_revoke, "revoke"},
        {&s_deliver_live, "deliver_live"}, {&s_organization_id, "organization_id"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].name == NULL &&
            (*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return NULL;
        }
    }
    return PyModuleDef_Init(&speedups_module);
}
