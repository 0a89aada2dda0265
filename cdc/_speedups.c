/* The pgoutput tuple loop in C: the one Python loop that runs once per column of every row.
 *
 * Optional. `cdc.decoder` uses `read_cells` from here when the extension was built and its own
 * Python `_read_cells` otherwise; both take and return the same values and fail the same way
 * (tests/test_decoder.py runs every case through both, tests/test_fuzz.py compares them).
 *
 * read_cells(buf: bytes, pos: int, ncols: int, unchanged: object) -> (tuple, int)
 *
 * Reads `ncols` TupleData cells of `buf` starting at `pos` (just past the column count) and
 * returns them with the position after the last one: 't' and 'b' cells as bytes, 'n' as None,
 * 'u' as `unchanged`. It fails exactly where and how the Python loop does: IndexError where
 * that one would read a cell kind past the end, ValueError (same message) for an unknown kind
 * or a last cell whose length runs past the end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>

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
    PyObject *unchanged = args[3];
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(buf);
    Py_ssize_t size = PyBytes_GET_SIZE(buf);

    PyObject *cells = PyTuple_New(ncols);
    if (cells == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        if (pos >= size) {
            PyErr_SetString(PyExc_IndexError, "tuple cell past the end of the message");
            goto fail;
        }
        unsigned char kind = data[pos];
        PyObject *cell;
        if (kind == 't' || kind == 'b') {
            if (size - pos < 5) {
                PyErr_SetString(PyExc_IndexError, "tuple cell length past the end of the message");
                goto fail;
            }
            uint32_t length = ((uint32_t)data[pos + 1] << 24) | ((uint32_t)data[pos + 2] << 16) |
                              ((uint32_t)data[pos + 3] << 8) | (uint32_t)data[pos + 4];
            Py_ssize_t start = pos + 5;
            if ((uint64_t)length > (uint64_t)(size - start)) {
                /* As the Python loop sees it: the next cell's kind is past the end, or, after
                   the last cell, the position is. */
                if (i + 1 < ncols) {
                    PyErr_SetString(PyExc_IndexError, "tuple cell past the end of the message");
                }
                else {
                    PyErr_SetString(PyExc_ValueError, "tuple cell length is negative or past the end");
                }
                goto fail;
            }
            cell = PyBytes_FromStringAndSize((const char *)data + start, (Py_ssize_t)length);
            if (cell == NULL) {
                goto fail;
            }
            pos = start + (Py_ssize_t)length;
        }
        else if (kind == 'n') {
            cell = Py_NewRef(Py_None);
            pos += 1;
        }
        else if (kind == 'u') {
            cell = Py_NewRef(unchanged);
            pos += 1;
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
    return Py_BuildValue("(Nn)", cells, pos);

fail:
    Py_DECREF(cells);
    return NULL;
}

static PyMethodDef speedups_methods[] = {
    {"read_cells", (PyCFunction)(void (*)(void))read_cells, METH_FASTCALL,
     "read_cells(buf, pos, ncols, unchanged) -> (cells, end): pgoutput TupleData cells."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cdc._speedups",
    .m_doc = "Optional C version of cdc.decoder's tuple loop.",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
