/* A profile hook for bench/stages.py: callgrind collects only while a request
 * is in one chosen stage.
 *
 * Every Python frame and C call is given a stage by a rule (a map from the
 * stage it is entered in to the stage it runs in), chosen once per code
 * object (kept in the code's co_extra) or C method (a small table) by a
 * Python function of bench/stages.py. The hook keeps a stack of stages; when
 * the innermost stage becomes or stops being the target, it toggles
 * callgrind's collection (CALLGRIND_TOGGLE_COLLECT). It also counts its own
 * calls per stage, so that bench/stages.py can take the hook's cost back out.
 * Built by bench/stages.py with the system C compiler; used only under
 * valgrind --tool=callgrind --collect-atstart=no.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <valgrind/callgrind.h>

#define MAX_STAGES 32
#define MAX_RULES 64
#define MAX_DEPTH 100000
#define C_SLOTS 4096

static int stages;
static int rules;
static int rule_map[MAX_RULES][MAX_STAGES];
static PyObject *classify_code;
static PyObject *classify_c;
static Py_ssize_t extra_index = -1;
static int stack[MAX_DEPTH];
static int depth;
static int target = -1;
static unsigned long long events[MAX_STAGES];
static const void *c_keys[C_SLOTS];
static int c_rules[C_SLOTS];

static inline int current(void)
{
    /* Python's recursion limit keeps depth far below MAX_DEPTH. */
    return depth ? stack[(depth > MAX_DEPTH ? MAX_DEPTH : depth) - 1] : 0;
}

static inline void enter(int stage)
{
    int before = current();
    if (depth < MAX_DEPTH)
        stack[depth] = stage;
    depth++;
    if ((before == target) != (stage == target))
        CALLGRIND_TOGGLE_COLLECT;
}

static inline void leave(void)
{
    if (depth == 0)
        return; /* a frame entered before the hook was set */
    int before = current();
    depth--;
    int after = current();
    if ((before == target) != (after == target))
        CALLGRIND_TOGGLE_COLLECT;
}

static int rule_of(PyObject *classify, PyObject *obj)
{
    PyObject *result = PyObject_CallOneArg(classify, obj);
    if (result == NULL) {
        PyErr_WriteUnraisable(classify);
        return 0;
    }
    long rule = PyLong_AsLong(result);
    Py_DECREF(result);
    return (rule >= 0 && rule < rules) ? (int)rule : 0;
}

static int code_rule(PyFrameObject *frame)
{
    PyCodeObject *code = PyFrame_GetCode(frame);
    void *extra = NULL;
    int rule;
    if (_PyCode_GetExtra((PyObject *)code, extra_index, &extra) == 0 && extra != NULL) {
        rule = (int)(Py_intptr_t)extra - 1;
    } else {
        rule = rule_of(classify_code, (PyObject *)code);
        _PyCode_SetExtra((PyObject *)code, extra_index, (void *)(Py_intptr_t)(rule + 1));
    }
    Py_DECREF(code);
    return rule;
}

static int c_rule(PyObject *func)
{
    if (!PyCFunction_Check(func))
        return 0;
    const void *key = ((PyCFunctionObject *)func)->m_ml;
    size_t slot = ((size_t)key >> 4) % C_SLOTS;
    for (int probe = 0; probe < C_SLOTS; probe++, slot = (slot + 1) % C_SLOTS) {
        if (c_keys[slot] == key)
            return c_rules[slot];
        if (c_keys[slot] == NULL) {
            int rule = rule_of(classify_c, func);
            c_keys[slot] = key;
            c_rules[slot] = rule;
            return rule;
        }
    }
    return 0;
}

static int hook(PyObject *obj, PyFrameObject *frame, int what, PyObject *arg)
{
    events[current()]++;
    switch (what) {
    case PyTrace_CALL:
        enter(rule_map[code_rule(frame)][current()]);
        break;
    case PyTrace_C_CALL:
        enter(rule_map[c_rule(arg)][current()]);
        break;
    case PyTrace_RETURN:
    case PyTrace_C_RETURN:
    case PyTrace_C_EXCEPTION:
        leave();
        break;
    }
    return 0;
}

/* install(classify_code, classify_c, maps): maps[r][s] is the stage a frame of
 * rule r runs in when entered in stage s; rule 0 must be "inherit". */
static PyObject *install(PyObject *self, PyObject *args)
{
    PyObject *code_fn, *c_fn, *maps;
    if (!PyArg_ParseTuple(args, "OOO", &code_fn, &c_fn, &maps))
        return NULL;
    Py_ssize_t count = PySequence_Size(maps);
    if (count < 1 || count > MAX_RULES)
        return PyErr_Format(PyExc_ValueError, "1 to %d rules", MAX_RULES);
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *row = PySequence_GetItem(maps, r);
        if (row == NULL)
            return NULL;
        Py_ssize_t width = PySequence_Size(row);
        if (width < 1 || width > MAX_STAGES) {
            Py_DECREF(row);
            return PyErr_Format(PyExc_ValueError, "1 to %d stages", MAX_STAGES);
        }
        stages = (int)width;
        for (Py_ssize_t s = 0; s < width; s++) {
            PyObject *item = PySequence_GetItem(row, s);
            rule_map[r][s] = (int)PyLong_AsLong(item);
            Py_XDECREF(item);
        }
        Py_DECREF(row);
    }
    rules = (int)count;
    if (extra_index < 0)
        extra_index = _PyEval_RequestCodeExtraIndex(NULL);
    Py_XSETREF(classify_code, Py_NewRef(code_fn));
    Py_XSETREF(classify_c, Py_NewRef(c_fn));
    memset(c_keys, 0, sizeof c_keys);
    depth = 0;
    PyEval_SetProfile(hook, NULL);
    Py_RETURN_NONE;
}

static PyObject *uninstall(PyObject *self, PyObject *unused)
{
    PyEval_SetProfile(NULL, NULL);
    depth = 0;
    Py_RETURN_NONE;
}

/* set_target(stage): collect while in that stage (-1: never). Called from the
 * harness, outside every request (stage 0, or no hook). */
static PyObject *set_target(PyObject *self, PyObject *arg)
{
    int stage = (int)PyLong_AsLong(arg);
    if (stage == -1 && PyErr_Occurred())
        return NULL;
    int now = current();
    if ((now == target) != (now == stage))
        CALLGRIND_TOGGLE_COLLECT;
    target = stage;
    Py_RETURN_NONE;
}

/* take_events(): the hook's calls per stage since the last take. */
static PyObject *take_events(PyObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(stages);
    if (list == NULL)
        return NULL;
    for (int s = 0; s < stages; s++) {
        PyList_SET_ITEM(list, s, PyLong_FromUnsignedLongLong(events[s]));
        events[s] = 0;
    }
    return list;
}

static PyObject *toggle_collect(PyObject *self, PyObject *unused)
{
    CALLGRIND_TOGGLE_COLLECT;
    Py_RETURN_NONE;
}

static PyObject *start_instrumentation(PyObject *self, PyObject *unused)
{
    CALLGRIND_START_INSTRUMENTATION;
    Py_RETURN_NONE;
}

static PyObject *zero(PyObject *self, PyObject *unused)
{
    CALLGRIND_ZERO_STATS;
    Py_RETURN_NONE;
}

static PyObject *dump(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    CALLGRIND_DUMP_STATS_AT(name);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "Set the hook: classify_code, classify_c, maps."},
    {"uninstall", uninstall, METH_NOARGS, "Remove the hook."},
    {"set_target", set_target, METH_O, "Collect while in this stage (-1: never)."},
    {"take_events", take_events, METH_NOARGS, "The hook's calls per stage; reset."},
    {"toggle_collect", toggle_collect, METH_NOARGS, "CALLGRIND_TOGGLE_COLLECT."},
    {"start_instrumentation", start_instrumentation, METH_NOARGS, "Instrument from here."},
    {"zero", zero, METH_NOARGS, "CALLGRIND_ZERO_STATS."},
    {"dump", dump, METH_O, "CALLGRIND_DUMP_STATS_AT(name)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "stagehook", NULL, -1, methods};

PyMODINIT_FUNC PyInit_stagehook(void) { return PyModule_Create(&module); }
