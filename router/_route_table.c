/* The latency policy's prefill TTFT scan in C (router/latency.py: least_prefill_ttfts).
 *
 * least_two(table, prompt_len, block_size, overlap, row_of, skip_rows)
 *     -> (first row, its TTFT, second row, its TTFT)
 *
 * `table` is the prefill index's latency table (router.worker_index.RoleIndex.table of
 * router.latency.prefill_row): a C-contiguous float64 array, one row per prefill worker of
 * (queued tokens, step_ms, per_prompt_token_ms, token budget). Per row the TTFT of a prompt
 * of `prompt_len` tokens prefilled there, with the worker's cached blocks of it
 * (`overlap`: worker_id -> blocks, a dict; `row_of`: worker_id -> row, a dict) taken off and
 * the rows in `skip_rows` (a sequence of ints) and any NaN at +inf:
 *
 *     ahead = queued + max(1, prompt_len)                        (nothing cached)
 *     ahead = queued + max(1, rint(prompt_len - min(blocks * block_size, prompt_len)))
 *     ttft  = ceil(ahead / budget) * step_ms + per_token_ms * ahead
 *
 * the same IEEE operations in the same order as the numpy expression it replaces (this file
 * is compiled with -ffp-contract=off: no fused multiply-add), so the same doubles. Returns
 * the row with the least TTFT (the first such row: the least worker_id) and the least of
 * the other rows (again the first), as numpy's argmin would find them. With every row at
 * +inf the rows returned are not meaningful (the caller checks the TTFT).
 *
 * Valid C and C++ (torch's extension builder compiles it as C++ where it builds the kernels).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

static int
row_index(PyObject *row_obj, Py_ssize_t n, Py_ssize_t *row)
{
    Py_ssize_t r = PyNumber_AsSsize_t(row_obj, PyExc_IndexError);
    if (r == -1 && PyErr_Occurred())
        return -1;
    if (r < 0 || r >= n) {
        PyErr_Format(PyExc_IndexError, "row %zd outside a table of %zd rows", r, n);
        return -1;
    }
    *row = r;
    return 0;
}

static PyObject *
least_two(PyObject *self, PyObject *args)
{
    PyObject *table_obj, *overlap, *row_of, *skip_rows;
    long long prompt_len;
    double block_size;
    if (!PyArg_ParseTuple(args, "OLdO!O!O:least_two", &table_obj, &prompt_len, &block_size,
                          &PyDict_Type, &overlap, &PyDict_Type, &row_of, &skip_rows))
        return NULL;

    Py_buffer view;
    if (PyObject_GetBuffer(table_obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    PyObject *result = NULL, *skip_seq = NULL, *worker_id, *blocks_obj;
    double *ahead = NULL;
    char *skipped = NULL;
    const double *table = (const double *)view.buf;
    const Py_ssize_t n = view.ndim == 2 ? view.shape[0] : 0;
    const double prompt = (double)prompt_len;
    const double uncached = prompt_len > 1 ? prompt : 1.0;
    Py_ssize_t pos = 0, row, first = -1, second = -1;
    double first_ttft = INFINITY, second_ttft = INFINITY;
    if (view.ndim != 2 || view.shape[1] != 4 || view.format == NULL ||
        strcmp(view.format, "d") != 0) {
        PyErr_SetString(PyExc_ValueError, "the table must be a float64 array of 4 columns");
        goto done;
    }
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "the table has no rows");
        goto done;
    }
    ahead = (double *)PyMem_Malloc((size_t)n * sizeof(double));
    skipped = (char *)PyMem_Calloc((size_t)n, 1);
    if (ahead == NULL || skipped == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        ahead[i] = table[4 * i] + uncached;

    while (PyDict_Next(overlap, &pos, &worker_id, &blocks_obj)) {
        PyObject *row_obj = PyDict_GetItemWithError(row_of, worker_id);  /* borrowed */
        if (row_obj == NULL) {
            if (PyErr_Occurred())
                goto done;
            continue;  /* not a prefill worker of this table */
        }
        if (row_index(row_obj, n, &row) < 0)
            goto done;
        const double blocks = PyFloat_AsDouble(blocks_obj);
        if (blocks == -1.0 && PyErr_Occurred())
            goto done;
        double cached = blocks * block_size;
        if (!(cached < prompt))  /* np.minimum(cached, prompt_len) */
            cached = isnan(cached) ? cached : prompt;
        const double rest = rint(prompt - cached);
        ahead[row] = table[4 * row] + (rest > 1.0 || isnan(rest) ? rest : 1.0);
    }

    skip_seq = PySequence_Fast(skip_rows, "skip_rows must be a sequence of rows");
    if (skip_seq == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(skip_seq); k++) {
        if (row_index(PySequence_Fast_GET_ITEM(skip_seq, k), n, &row) < 0)
            goto done;
        skipped[row] = 1;
    }

    for (Py_ssize_t i = 0; i < n; i++) {
        const double *r = table + 4 * i;
        double ttft = INFINITY;
        if (!skipped[i]) {
            ttft = ceil(ahead[i] / r[3]);
            ttft *= r[1];
            ttft += r[2] * ahead[i];
            if (isnan(ttft))  /* a NaN in the row or the cached run: no candidate */
                ttft = INFINITY;
        }
        if (first < 0 || ttft < first_ttft) {
            second = first;
            second_ttft = first_ttft;
            first = i;
            first_ttft = ttft;
        } else if (second < 0 || ttft < second_ttft) {
            second = i;
            second_ttft = ttft;
        }
    }
    result = Py_BuildValue("(ndnd)", first, first_ttft, second < 0 ? first : second,
                           second < 0 ? INFINITY : second_ttft);
done:
    Py_XDECREF(skip_seq);
    PyMem_Free(ahead);
    PyMem_Free(skipped);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"least_two", least_two, METH_VARARGS,
     "least_two(table, prompt_len, block_size, overlap, row_of, skip_rows) -> "
     "(first row, its TTFT, second row, its TTFT): the two least prefill TTFTs of the "
     "latency table (router/latency.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_route_table",
    "The latency policy's prefill TTFT scan (router/latency.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__route_table(void)
{
    return PyModule_Create(&module);
}
