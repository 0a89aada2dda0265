/* The per-change work of `walcast.routing` and `walcast.pipeline` in C: routing the common
 * INSERT, UPDATE or DELETE in one call, and the pipeline's loop over a run of row changes.
 *
 * Optional. Without it (no compiler) the pipeline calls `Router.route` for every item, which
 * stays the definition: `route_row_change` routes only the cases whose answer it is sure of
 * and hands everything else to that very method (tests/test_routing.py feeds random changes
 * both ways and requires the same events and the same counts), and the pipeline loops in
 * Python (tests/test_pipeline_loop.py checks the two loops against each other).
 *
 * route_row_change((tables, state, row_change, event, kinds, fallback), item) -> list
 *     `item` is a `row_change` (cdc.changes.RowChange) of a table in `tables` ((schema, table)
 *     -> the router's _TableRoute: table config, on_insert, on_update, on_delete, organization,
 *     user and owner columns) whose kind is `kinds[0]` (INSERT, with on_insert), `kinds[1]`
 *     (DELETE, with on_delete) or `kinds[2]` (UPDATE, with on_update, that leaves the row's
 *     organization and user as they were), whose rows' organization is a str and whose user
 *     and owner (when the table names those columns) are a str or None, while `state`
 *     ([commit time, transaction id, epoch], kept by the router) has a commit time: the answer
 *     is one `event` (gateway.events.ChangeEvent) in a list, built as the router builds it.
 *     Anything else: `fallback(item)`.
 *
 * publish_changes(items, start, row_change, counts, route_change, publish) -> int
 *     Twin: walcast.pipeline.publish_changes_py. The pipeline's loop over a run of row
 *     changes: from `items[start]` on, while an item is a `row_change`, count it in `counts`
 *     under `item[2:5]` (schema, table, kind), route it with `route_change(item)` and hand a
 *     non-empty answer to `publish`. Returns the index of the first item it did not take. An
 *     exception from `route_change` or `publish` propagates, the item already counted, as in
 *     the Python loop. The counts of a run's changes of one relation are added to `counts`
 *     once, when the relation changes and when the call returns: nothing can read them in
 *     between.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The fields of cdc.changes.RowChange and of walcast.routing._TableRoute used here. */
enum { CHANGE_LSN, CHANGE_POSITION, CHANGE_SCHEMA, CHANGE_TABLE, CHANGE_KIND, CHANGE_NEW,
       CHANGE_OLD, CHANGE_UNCHANGED, CHANGE_FIELDS };
enum { ROUTE_TABLE, ROUTE_ON_INSERT, ROUTE_ON_UPDATE, ROUTE_ON_DELETE, ROUTE_ORGANIZATION,
       ROUTE_USER, ROUTE_OWNER, ROUTE_FIELDS };
#define EVENT_FIELDS 12

/* The row's value of `column` (a borrowed reference, or Py_None) when the table names that
 * column and the value is a str or NULL; NULL when routing it needs the Python path. */
static PyObject *
text_column(PyObject *row, PyObject *column)
{
    if (column == Py_None || !PyUnicode_Check(column) || PyUnicode_GET_LENGTH(column) == 0) {
        return Py_None; /* the table names no such column (the router's `if user_column`) */
    }
    PyObject *value = PyDict_GetItemWithError(row, column);
    if (value == NULL) {
        return PyErr_Occurred() ? NULL : Py_None;
    }
    if (value == Py_None || PyUnicode_CheckExact(value)) {
        return value;
    }
    return NULL;
}

/* What the router answers for `item`, unless reading it failed (an error is set): the
 * answer for everything this file is not sure of. */
static PyObject *
hand_over(PyObject *fallback, PyObject *item)
{
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(fallback, item);
}

/* [event]: the ChangeEvent of `item` for `organization`, as the router builds it. */
static PyObject *
one_event(PyObject *item, PyObject *route, PyObject *state, PyTypeObject *event,
          PyObject *organization, PyObject *new_row, PyObject *old_row, PyObject *user,
          PyObject *owner)
{
    PyObject *cursor_key = PyTuple_Pack(2, PyTuple_GET_ITEM(item, CHANGE_LSN),
                                        PyTuple_GET_ITEM(item, CHANGE_POSITION));
    if (cursor_key == NULL) {
        return NULL;
    }
    PyObject *routed = event->tp_alloc(event, EVENT_FIELDS);
    if (routed == NULL) {
        Py_DECREF(cursor_key);
        return NULL;
    }
    PyObject *fields[EVENT_FIELDS] = {
        organization,
        cursor_key,
        PyList_GET_ITEM(state, 2), /* epoch */
        PyList_GET_ITEM(state, 0), /* commit time */
        PyTuple_GET_ITEM(route, ROUTE_TABLE),
        PyTuple_GET_ITEM(item, CHANGE_KIND),
        new_row,
        old_row,
        PyTuple_GET_ITEM(item, CHANGE_UNCHANGED),
        user,
        owner,
        PyList_GET_ITEM(state, 1), /* transaction id */
    };
    for (int i = 0; i < EVENT_FIELDS; i++) {
        if (i != 1) {
            Py_INCREF(fields[i]);
        }
        PyTuple_SET_ITEM(routed, i, fields[i]);
    }
    PyObject *events = PyList_New(1);
    if (events == NULL) {
        Py_DECREF(routed);
        return NULL;
    }
    PyList_SET_ITEM(events, 0, routed);
    return events;
}

/* Whether two values `text_column` gave (str or Py_None) are equal: 1, 0, or -1 on error. */
static int
same_text(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (a == Py_None || b == Py_None) {
        return 0;
    }
    return PyUnicode_Compare(a, b) == 0 ? 1 : (PyErr_Occurred() ? -1 : 0);
}

/* An UPDATE that keeps its organization and user: one UPDATE event, the owner kept only if
 * it owns both versions. The old row counts only if it has the organization column (with
 * REPLICA IDENTITY DEFAULT it is the key, or missing): otherwise the new row stands for it. */
static PyObject *
route_update(PyObject *item, PyObject *route, PyObject *state, PyTypeObject *event,
             PyObject *fallback)
{
    PyObject *new_row = PyTuple_GET_ITEM(item, CHANGE_NEW);
    PyObject *old_row = PyTuple_GET_ITEM(item, CHANGE_OLD);
    PyObject *org_column = PyTuple_GET_ITEM(route, ROUTE_ORGANIZATION);
    if (PyTuple_GET_ITEM(route, ROUTE_ON_UPDATE) != Py_True || !PyDict_CheckExact(new_row) ||
        !(old_row == Py_None || PyDict_CheckExact(old_row))) {
        return hand_over(fallback, item);
    }
    PyObject *before = new_row;
    if (old_row != Py_None) {
        int has = PyDict_Contains(old_row, org_column);
        if (has < 0) {
            return NULL;
        }
        if (has) {
            before = old_row;
        }
    }
    PyObject *values[6]; /* organization, user, owner: new, then before */
    for (int i = 0; i < 3; i++) {
        PyObject *column = PyTuple_GET_ITEM(route, ROUTE_ORGANIZATION + i);
        values[i] = text_column(new_row, column);
        if (values[i] == NULL) {
            return hand_over(fallback, item);
        }
        values[3 + i] = text_column(before, column);
        if (values[3 + i] == NULL) {
            return hand_over(fallback, item);
        }
    }
    if (values[0] == Py_None) {
        /* no organization: dropped and counted by the router */
        return hand_over(fallback, item);
    }
    int same_org = same_text(values[0], values[3]), same_user = same_text(values[1], values[4]);
    int same_owner = same_text(values[2], values[5]);
    if (same_org < 0 || same_user < 0 || same_owner < 0) {
        return NULL;
    }
    if (!same_org || !same_user) {
        /* the row moves: a DELETE for the old audience, an INSERT for the new */
        return hand_over(fallback, item);
    }
    return one_event(item, route, state, event, values[0], new_row, old_row, values[1],
                     same_owner ? values[2] : Py_None);
}

static PyObject *
route_row_change(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "route_row_change((tables, state, row_change, event, kinds, fallback), "
                        "item) takes 2 arguments");
        return NULL;
    }
    /* One tuple of what the router binds, so that its functools.partial passes 2 arguments,
     * which CPython's partial does without allocating an argument array per call. */
    PyObject *const *bound = &PyTuple_GET_ITEM(args[0], 0);
    PyObject *tables = bound[0], *state = bound[1], *kinds = bound[4], *fallback = bound[5];
    PyTypeObject *row_change = (PyTypeObject *)bound[2], *event = (PyTypeObject *)bound[3];
    PyObject *item = args[1];
    if (!PyDict_CheckExact(tables) || !PyList_CheckExact(state) || PyList_GET_SIZE(state) != 3 ||
        !PyTuple_CheckExact(kinds) || PyTuple_GET_SIZE(kinds) != 3 || !PyType_Check(bound[2]) ||
        !PyType_Check(bound[3]) || !PyType_IsSubtype(event, &PyTuple_Type) ||
        event->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_SetString(PyExc_TypeError, "route_row_change: wrong argument types");
        return NULL;
    }
    if (Py_TYPE(item) != row_change || PyTuple_GET_SIZE(item) != CHANGE_FIELDS) {
        return hand_over(fallback, item);
    }
    PyObject *commit_time = PyList_GET_ITEM(state, 0);
    if (commit_time == Py_None) {
        return hand_over(fallback, item);
    }
    PyObject *key = PyTuple_Pack(2, PyTuple_GET_ITEM(item, CHANGE_SCHEMA),
                                 PyTuple_GET_ITEM(item, CHANGE_TABLE));
    if (key == NULL) {
        return NULL;
    }
    PyObject *route = PyDict_GetItemWithError(tables, key);
    Py_DECREF(key);
    if (route == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        /* the session store, a withheld or an unconfigured table */
        return hand_over(fallback, item);
    }
    if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != ROUTE_FIELDS) {
        return hand_over(fallback, item);
    }
    PyObject *kind = PyTuple_GET_ITEM(item, CHANGE_KIND), *row, *new_row, *old_row;
    if (kind == PyTuple_GET_ITEM(kinds, 2)) {
        return route_update(item, route, state, event, fallback);
    }
    if (kind == PyTuple_GET_ITEM(kinds, 0)) {
        if (PyTuple_GET_ITEM(route, ROUTE_ON_INSERT) != Py_True) {
            return hand_over(fallback, item);
        }
        row = new_row = PyTuple_GET_ITEM(item, CHANGE_NEW);
        old_row = Py_None;
    }
    else if (kind == PyTuple_GET_ITEM(kinds, 1)) {
        if (PyTuple_GET_ITEM(route, ROUTE_ON_DELETE) != Py_True) {
            return hand_over(fallback, item);
        }
        row = old_row = PyTuple_GET_ITEM(item, CHANGE_OLD);
        new_row = Py_None;
    }
    else {
        /* TRUNCATE, or a kind string that is not the interned one */
        return hand_over(fallback, item);
    }
    if (!PyDict_CheckExact(row)) {
        return hand_over(fallback, item);
    }
    PyObject *organization = text_column(row, PyTuple_GET_ITEM(route, ROUTE_ORGANIZATION));
    if (organization == NULL || organization == Py_None) {
        return hand_over(fallback, item);
    }
    PyObject *user = text_column(row, PyTuple_GET_ITEM(route, ROUTE_USER));
    if (user == NULL) {
        return hand_over(fallback, item);
    }
    PyObject *owner = text_column(row, PyTuple_GET_ITEM(route, ROUTE_OWNER));
    if (owner == NULL) {
        return hand_over(fallback, item);
    }

    return one_event(item, route, state, event, organization, new_row, old_row, user, owner);
}

/* The changes of a run counted so far and not yet in `counts`: `pending` changes of the
 * relation of `first` (schema, table, kind), a run's changes mostly sharing one. */
typedef struct {
    PyObject *first;
    Py_ssize_t pending;
} Tally;

/* counts[first[2:5]] += pending, from 0: `walcast_changes_total` by (schema, table, kind).
 * Keeps an exception already set (a callback's) in place of its own. */
static int
flush_tally(PyObject *counts, Tally *tally)
{
    if (tally->first == NULL) {
        return 0;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *relation = PyTuple_GetSlice(tally->first, CHANGE_SCHEMA, CHANGE_KIND + 1);
    Py_CLEAR(tally->first);
    int stored = -1;
    if (relation != NULL) {
        PyObject *seen = PyDict_GetItemWithError(counts, relation);
        PyObject *count = NULL;
        if (seen != NULL) {
            PyObject *more = PyLong_FromSsize_t(tally->pending);
            count = more == NULL ? NULL : PyNumber_Add(seen, more);
            Py_XDECREF(more);
        }
        else if (!PyErr_Occurred()) {
            count = PyLong_FromSsize_t(tally->pending);
        }
        stored = count == NULL ? -1 : PyDict_SetItem(counts, relation, count);
        Py_DECREF(relation);
        Py_XDECREF(count);
    }
    if (type != NULL) {
        PyErr_Clear();
        PyErr_Restore(type, value, traceback);
        return -1;
    }
    return stored;
}

/* Count `change`: one more of the pending relation when it is the same objects, else the
 * pending count goes to `counts` and `change` starts another. */
static int
count_change(PyObject *counts, Tally *tally, PyObject *change)
{
    PyObject *first = tally->first;
    if (first != NULL &&
        PyTuple_GET_ITEM(first, CHANGE_SCHEMA) == PyTuple_GET_ITEM(change, CHANGE_SCHEMA) &&
        PyTuple_GET_ITEM(first, CHANGE_TABLE) == PyTuple_GET_ITEM(change, CHANGE_TABLE) &&
        PyTuple_GET_ITEM(first, CHANGE_KIND) == PyTuple_GET_ITEM(change, CHANGE_KIND)) {
        tally->pending++;
        return 0;
    }
    if (flush_tally(counts, tally) < 0) {
        return -1;
    }
    tally->first = Py_NewRef(change);
    tally->pending = 1;
    return 0;
}

static PyObject *
publish_changes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyType_Check(args[2]) ||
        !PyDict_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "publish_changes(items: list, start, row_change: type, counts: dict, "
                        "route_change, publish)");
        return NULL;
    }
    PyObject *items = args[0], *counts = args[3], *route_change = args[4], *publish = args[5];
    PyTypeObject *row_change = (PyTypeObject *)args[2];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "publish_changes: start must not be negative");
        return NULL;
    }
    Tally tally = {NULL, 0};
    /* The list may change under a callback: its size is read again for every item. */
    for (; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (Py_TYPE(item) != row_change || PyTuple_GET_SIZE(item) < CHANGE_KIND + 1) {
            break;
        }
        if (count_change(counts, &tally, item) < 0) {
            goto failed;
        }
        Py_INCREF(item); /* the callbacks may change the list */
        PyObject *events = PyObject_CallOneArg(route_change, item);
        Py_DECREF(item);
        if (events == NULL) {
            goto failed;
        }
        int any = PyObject_IsTrue(events);
        PyObject *published = any > 0 ? PyObject_CallOneArg(publish, events) : NULL;
        Py_DECREF(events);
        if (any < 0 || (any > 0 && published == NULL)) {
            goto failed;
        }
        Py_XDECREF(published);
    }
    if (flush_tally(counts, &tally) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(i);
failed:
    flush_tally(counts, &tally); /* what was counted stays counted, as in the Python loop */
    return NULL;
}

static PyMethodDef speedups_methods[] = {
    {"route_row_change", (PyCFunction)(void (*)(void))route_row_change, METH_FASTCALL,
     "route_row_change((tables, state, row_change, event, kinds, fallback), item) -> list: the "
     "events of one reader item, the common INSERT, UPDATE or DELETE routed here."},
    {"publish_changes", (PyCFunction)(void (*)(void))publish_changes, METH_FASTCALL,
     "publish_changes(items, start, row_change, counts, route_change, publish) -> int: the "
     "pipeline's loop over a run of row changes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "walcast._speedups",
    .m_doc = "The common row change of walcast.routing in C (optional; see walcast/_speedups.c).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
