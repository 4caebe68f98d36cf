/* The prefix index's device lookup in C (cluster/prefix_index.py: PrefixIndex._device_ends).
 *
 * device_ends(masks, block_hashes, running, slot_ids) -> {worker_id: end}
 *
 * `masks` is the device tier's dict of block hash -> the int whose bits are the slots of the
 * workers holding the block; `block_hashes` a prompt's block hashes (a sequence, at least
 * one); `running` the bits of the workers holding its first block, already scoped (an int);
 * `slot_ids` the list of slot -> worker id. For each worker of `running`, the end of its
 * unbroken run of the prompt's blocks (the index of the first block it does not hold, or
 * len(block_hashes)): the same dict, in the same insertion order (by end, then by slot
 * from the highest), as the Python loop it replaces.
 *
 * The Python loop ANDs each block's holders into a 1,000-bit int and walks the bits of the
 * workers whose run ended, each step a new int; here the running workers' slots are read
 * once into an array and each block costs a dict lookup and a bit test per worker still
 * running.
 *
 * A negative mask is refused (TypeError) where the digits are read in place; the bytes path
 * ANDs it like the Python loop. Valid C and C++ (torch's extension builder compiles it as C++
 * where it builds the kernels).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* How a block's holders are read. Where this CPython's int layout is known (3.10-3.14: an
 * array of PyLong_SHIFT-bit digits, least significant first), a worker's bit is read in place:
 * no int made per block. Elsewhere each block's holders are ANDed with the first block's (so
 * the result fits in its bytes) and copied out as bytes (PyLong_AsNativeBytes: 3.13 and later;
 * -DSPLITSERVE_INTS_AS_BYTES takes this path on them too, for its tests). */
#if defined(SPLITSERVE_INTS_AS_BYTES) || PY_VERSION_HEX >= 0x030F0000
#define DIGITS_IN_PLACE 0
#elif PY_VERSION_HEX < 0x030C0000
#define DIGITS_IN_PLACE 1
#define INT_NEGATIVE(v) (Py_SIZE(v) < 0)
#define INT_NUM_DIGITS(v) Py_SIZE(v)
#define INT_DIGITS(v) (((PyLongObject *)(v))->ob_digit)
#else
#define DIGITS_IN_PLACE 1
#define INT_NEGATIVE(v) ((((PyLongObject *)(v))->long_value.lv_tag & 3) == 2)
#define INT_NUM_DIGITS(v) ((Py_ssize_t)(((PyLongObject *)(v))->long_value.lv_tag >> 3))
#define INT_DIGITS(v) (((PyLongObject *)(v))->long_value.ob_digit)
#endif

/* A block's holders, as read for the bit tests: `num_units` units of UNIT_BITS bits, least
 * significant first. */
#if DIGITS_IN_PLACE
typedef digit Unit;
#define UNIT_BITS PyLong_SHIFT
#else
typedef unsigned char Unit;
#define UNIT_BITS 8
#endif

typedef struct {
    const Unit *units;
    Py_ssize_t num_units;
    Unit *owned;  /* the bytes path's buffer (sized by the first block) */
} Holders;

#if DIGITS_IN_PLACE
static int
read_holders(Holders *h, PyObject *v, PyObject *first)
{
    (void)first;
    if (!PyLong_Check(v) || INT_NEGATIVE(v)) {
        PyErr_SetString(PyExc_TypeError, "a block's holders must be a non-negative int");
        return -1;
    }
    h->units = INT_DIGITS(v);
    h->num_units = INT_NUM_DIGITS(v);
    return 0;
}
#else
#define NATIVE_BYTES_FLAGS (Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER \
                            | Py_ASNATIVEBYTES_REJECT_NEGATIVE)

static int
read_holders(Holders *h, PyObject *v, PyObject *first)
{
    if (h->owned == NULL) {  /* the first block: the size every later one fits in */
        h->num_units = PyLong_AsNativeBytes(first, NULL, 0, NATIVE_BYTES_FLAGS);
        if (h->num_units < 0)
            return -1;
        h->owned = (Unit *)PyMem_Malloc((size_t)h->num_units + 1);
        if (h->owned == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->units = h->owned;
    }
    PyObject *kept = PyNumber_And(v, first);
    if (kept == NULL)
        return -1;
    Py_ssize_t rc = PyLong_Check(kept)
        ? PyLong_AsNativeBytes(kept, h->owned, h->num_units, NATIVE_BYTES_FLAGS) : -1;
    if (rc < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a block's holders must be a non-negative int");
    Py_DECREF(kept);
    return rc < 0 ? -1 : 0;
}
#endif

/* A running worker: its slot, and where its bit is in a block's holders. */
typedef struct {
    Py_ssize_t slot;
    Py_ssize_t unit;
    int shift;
} Running;

static inline int
holds(const Holders *h, const Running *r)
{
    return r->unit < h->num_units && (h->units[r->unit] >> r->shift & 1);
}

/* The set bits of `h` into `out` (room for every bit), the highest first; their number. */
static Py_ssize_t
running_slots(const Holders *h, Running *out)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t unit = h->num_units - 1; unit >= 0; unit--) {
        const Unit bits = h->units[unit];
        for (int shift = UNIT_BITS - 1; bits != 0 && shift >= 0; shift--) {
            if (bits >> shift & 1) {
                out[n].slot = unit * UNIT_BITS + shift;
                out[n].unit = unit;
                out[n].shift = shift;
                n++;
            }
        }
    }
    return n;
}

/* ends[slot_ids[slot]] = end. (The slot was in the list when the call began; a worker id's
 * __hash__ or __eq__, run by an earlier insertion, could have shortened it since.) */
static int
set_end(PyObject *ends, PyObject *slot_ids, Py_ssize_t slot, Py_ssize_t end)
{
    if (slot >= PyList_GET_SIZE(slot_ids)) {
        PyErr_Format(PyExc_IndexError, "slot %zd has no worker", slot);
        return -1;
    }
    PyObject *value = PyLong_FromSsize_t(end);
    if (value == NULL)
        return -1;
    int rc = PyDict_SetItem(ends, PyList_GET_ITEM(slot_ids, slot), value);
    Py_DECREF(value);
    return rc;
}

static PyObject *
device_ends(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *masks, *hashes_obj, *running, *slot_ids;
    if (!PyArg_ParseTuple(args, "O!OO!O!:device_ends", &PyDict_Type, &masks, &hashes_obj,
                          &PyLong_Type, &running, &PyList_Type, &slot_ids))
        return NULL;
    /* A tuple of its own: the insertions below may run Python code (a worker id's __hash__
     * or __eq__), which must not change the blocks under the loop. */
    PyObject *hashes = PySequence_Tuple(hashes_obj);
    if (hashes == NULL)
        return NULL;
    const Py_ssize_t num_blocks = PyTuple_GET_SIZE(hashes);
    PyObject *ends = PyDict_New(), *result = NULL, *block = NULL;
    Holders holders;
    memset(&holders, 0, sizeof holders);
    Running *alive = NULL;
    Py_ssize_t num_alive = 0;
    if (ends == NULL || read_holders(&holders, running, running) < 0)
        goto done;
    if (PyObject_IsTrue(running)) {
        /* The running workers' slots, highest first (the Python loop's order). */
        alive = PyMem_New(Running, (size_t)(holders.num_units * UNIT_BITS));
        if (alive == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        num_alive = running_slots(&holders, alive);
        if (num_alive > 0 && alive[0].slot >= PyList_GET_SIZE(slot_ids)) {
            PyErr_Format(PyExc_IndexError, "slot %zd has no worker", alive[0].slot);
            goto done;
        }
    }
    for (Py_ssize_t i = 1; i < num_blocks && num_alive > 0; i++) {
        Py_CLEAR(block);
        block = PyDict_GetItemWithError(masks, PyTuple_GET_ITEM(hashes, i));
        if (block == NULL && PyErr_Occurred())
            goto done;
        /* Held while its digits are read: an insertion below may run Python code that
         * drops it from `masks`. */
        Py_XINCREF(block);
        if (block != NULL && read_holders(&holders, block, running) < 0)
            goto done;
        Py_ssize_t still = 0;
        for (Py_ssize_t k = 0; k < num_alive; k++) {
            if (block != NULL && holds(&holders, &alive[k]))
                alive[still++] = alive[k];
            else if (set_end(ends, slot_ids, alive[k].slot, i) < 0)
                goto done;
        }
        num_alive = still;
    }
    for (Py_ssize_t k = 0; k < num_alive; k++)
        if (set_end(ends, slot_ids, alive[k].slot, num_blocks) < 0)
            goto done;
    result = ends;
    ends = NULL;
done:
    Py_XDECREF(block);
    Py_XDECREF(ends);
    Py_DECREF(hashes);
    PyMem_Free(holders.owned);
    PyMem_Free(alive);
    return result;
}

static PyMethodDef methods[] = {
    {"device_ends", device_ends, METH_VARARGS,
     "device_ends(masks, block_hashes, running, slot_ids) -> {worker_id: end}: each running "
     "worker's unbroken run of the prompt's blocks on its device "
     "(cluster/prefix_index.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prefix_runs",
    "The prefix index's device lookup (cluster/prefix_index.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__prefix_runs(void)
{
    return PyModule_Create(&module);
}
