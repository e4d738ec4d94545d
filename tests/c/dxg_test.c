/* SPDX-License-Identifier: MIT */
/*
 * dxg_test: an unmodified-style C client of /dev/dxg, run against pydxg's FUSE device file.
 *
 * It includes only the generated dxg_uapi.h (Linux d3dkmthk.h names plus the libdxg payload
 * typedefs), opens the file O_RDONLY | O_CLOEXEC like libdxg, and drives it with plain ioctl().
 * Every status is checked; each ioctl exercised prints one line ("ok ..." or "FAIL ...") and
 * the program exits non-zero on any unexpected status.
 *
 *   dxg_test [-q] [-p] [-a ADAPTERS] [-t THREADS] [-n ITERATIONS] PATH MODE
 *
 * MODE:
 *   all      every implemented ioctl and the error paths, once (device memory included)
 *   memory   device memory only: allocations (standalone, a resource, a standard one), Lock2
 *            (EOPNOTSUPP through a file), budgets and reservations, a paging queue, GPU
 *            virtual addresses, residency, priorities, offers, and their error paths
 *   sync     synchronization objects: monitored fences signalled and waited on from the CPU
 *            (blocking on a reached value, on a value a second thread signals, with an
 *            eventfd, wait-any and wait-all), GPU signals and waits on a context, the legacy
 *            Signal/Wait on a semaphore and a CPU notification, and their error paths; sharing
 *            (ShareObjects and CreateSyncFile -EOPNOTSUPP through a file, ShareObjectWithHost,
 *            descriptors that are not the driver's)
 *   queue    hardware queues: CreateHwQueue (no progress-fence page through the file), context
 *            scheduling priorities (both kinds, -7..7), fences signalled and waited on by the
 *            queue, a command buffer at an unmapped VA that faults a second device alone (its
 *            state and faulted VA), MarkDeviceAsError on a third, QueryStatistics (pydxg's
 *            record), InvalidateCache, DestroyHwQueue; with -p also command buffers the program
 *            builds (FILL, then an add on the queue, a multiply by SubmitCommand) and checks
 *   threads  the full sequence from THREADS pthreads at once on one shared descriptor,
 *            ITERATIONS times each
 *   fork     a forked child using the parent's descriptor gets ENOTTY; it reopens and works
 *   hold     open an adapter, a device and a context, print "ready", then wait for stdin to
 *            close (or a signal) and exit without destroying anything
 *   bench    ITERATIONS timed calls of EnumAdapters3 (count only) and QueryAdapterInfo
 *   sleep    THREADS pthreads each block in one pydxg SLEEP escape of ITERATIONS milliseconds
 *            on the first adapter (a long call: the host holds it); prints "sleeping" as the
 *            threads start (the node's in-flight count says when they are parked), then the
 *            outcome of each call
 *
 * -a ADAPTERS checks that EnumAdapters3 (compute-only included) reports exactly that many.
 * -p (queue) a memory peer answers on stdin: the program prints "@write VA HEX" and "@read VA N"
 *    and reads "ok" or the bytes as hex (a file cannot map device memory: see hwqueues()).
 * Build: gcc -O2 -Wall -Wextra -Werror -pthread -I DIR_WITH_dxg_uapi.h dxg_test.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dxg_uapi.h"

#define MAX_ADAPTERS 64
#define MAX_PIDS 1024

struct run {
	const char *path;
	const char *tag;       /* "" or "[t3] " for threads */
	int verbose;
	int expect_adapters;   /* -1: do not check */
	int checks;
	int failures;
};

/* ioctl() as the kernel returns it: the value, or -errno. */
static int dx(int fd, unsigned long code, void *arg)
{
	int r = ioctl(fd, code, arg);

	return r == -1 ? -errno : r;
}

static const char *errname(int ret)
{
	static __thread char buf[64];

	switch (-ret) {
	case 0: return "0";
	case EINVAL: return "-EINVAL";
	case EFAULT: return "-EFAULT";
	case ENOTTY: return "-ENOTTY";
	case EOVERFLOW: return "-EOVERFLOW";
	case EBADF: return "-EBADF";
	case ENODEV: return "-ENODEV";
	case ENOENT: return "-ENOENT";
	case EPERM: return "-EPERM";
	case ENOSYS: return "-ENOSYS";
	case ENOTCONN: return "-ENOTCONN";
	case EINTR: return "-EINTR";
	case EOPNOTSUPP: return "-EOPNOTSUPP";
	case EEXIST: return "-EEXIST";
	case EBUSY: return "-EBUSY";
	case ENOMEM: return "-ENOMEM";
	case EPROTO: return "-EPROTO";
	case EAGAIN: return "-EAGAIN";
	case EIO: return "-EIO";
	default: break;
	}
	snprintf(buf, sizeof(buf), "%d", ret);
	return buf;
}

static void note(struct run *r, int ok, const char *ioctl_name, const char *what, int ret,
		 const char *want, const char *fmt, ...)
{
	char detail[512] = "";
	va_list ap;

	r->checks++;
	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(detail, sizeof(detail), fmt, ap);
		va_end(ap);
	}
	if (!ok) {
		r->failures++;
		printf("%sFAIL %s (%s): got %s, want %s%s%s\n", r->tag, ioctl_name, what,
		       errname(ret), want, detail[0] ? "; " : "", detail);
		fflush(stdout);
	} else if (r->verbose) {
		printf("%sok   %s (%s) -> %s%s%s\n", r->tag, ioctl_name, what, errname(ret),
		       detail[0] ? ": " : "", detail);
	}
}

/* The status must be `want` exactly. */
#define EXPECT(r, name, what, ret, want, ...) \
	note((r), (ret) == (want), #name, (what), (ret), errname(want), __VA_ARGS__)
/* The status must be one of two. */
#define EXPECT2(r, name, what, ret, w1, w2, ...) \
	note((r), (ret) == (w1) || (ret) == (w2), #name, (what), (ret), #w1 " or " #w2, \
	     __VA_ARGS__)

/*
 * A stale or made-up handle: pydxg answers -EBADF (the real driver answers most of these
 * -EINVAL, which callers cannot tell from a bad argument); both are accepted.
 */
#define EXPECT_BAD_HANDLE(r, name, what, ret) \
	note((r), (ret) == -EBADF || (ret) == -EINVAL, #name, (what), (ret), \
	     "-EBADF or -EINVAL", NULL)

static int open_dev(struct run *r)
{
	int fd = open(r->path, O_RDONLY | O_CLOEXEC);

	r->checks++;
	if (fd < 0) {
		r->failures++;
		printf("%sFAIL open(%s): %s\n", r->tag, r->path, strerror(errno));
	} else if (r->verbose) {
		printf("%sok   open(%s, O_RDONLY|O_CLOEXEC) -> fd %d\n", r->tag, r->path, fd);
	}
	return fd;
}

static unsigned long long luid64(struct winluid l)
{
	return ((unsigned long long)l.b << 32) | l.a;
}

static void utf16_to_ascii(const __u16 *w, size_t n, char *out, size_t outlen)
{
	size_t i;

	for (i = 0; i < n && i + 1 < outlen && w[i]; i++)
		out[i] = w[i] < 0x80 ? (char)w[i] : '?';
	out[i] = 0;
}

static int query_info(int fd, struct d3dkmthandle adapter, unsigned int type, void *buf,
		      unsigned int size)
{
	struct d3dkmt_queryadapterinfo q;

	memset(&q, 0, sizeof(q));
	q.adapter = adapter;
	q.type = type;
	q.private_data = buf;
	q.private_data_size = size;
	return dx(fd, LX_DXQUERYADAPTERINFO, &q);
}

static int close_adapter(int fd, struct d3dkmthandle h)
{
	struct d3dkmt_closeadapter c;

	memset(&c, 0, sizeof(c));
	c.adapter_handle = h;
	return dx(fd, LX_DXCLOSEADAPTER, &c);
}

/*
 * pydxg's diagnostic escapes (dxg/uapi/escape.py): a 32-byte header (u32 magic "PDXE", u16
 * version 1, u16 op, u32 status out, u32 flags, i64 fd, u64 length) and the op's fields.
 */
#define PYDXG_ESCAPE_MAGIC 0x45584450u
#define PYDXG_ESCAPE_PING 1
#define PYDXG_ESCAPE_SLEEP 2
#define PYDXG_ESCAPE_HEADER 32

/* D3DKMTEscape of a pydxg op; *status gets the op's NTSTATUS. */
static int pydxg_escape(int fd, struct d3dkmthandle adapter, unsigned int op,
			unsigned int sleep_ms, unsigned int *status)
{
	unsigned char data[PYDXG_ESCAPE_HEADER + 8];
	struct d3dkmt_escape e;
	__u32 u32;
	__u16 u16;
	__s64 s64 = -1;
	int ret;

	memset(data, 0, sizeof(data));
	u32 = PYDXG_ESCAPE_MAGIC;
	memcpy(data, &u32, 4);
	u16 = 1;
	memcpy(data + 4, &u16, 2);
	u16 = (__u16)op;
	memcpy(data + 6, &u16, 2);
	memcpy(data + 16, &s64, 8);
	memcpy(data + PYDXG_ESCAPE_HEADER, &sleep_ms, 4);
	memset(&e, 0, sizeof(e));
	e.adapter = adapter;
	e.type = _D3DKMT_ESCAPE_DRIVERPRIVATE;
	e.priv_drv_data = (void *)data;
	e.priv_drv_data_size = op == PYDXG_ESCAPE_SLEEP ? PYDXG_ESCAPE_HEADER + 4
							: PYDXG_ESCAPE_HEADER;
	ret = dx(fd, LX_DXESCAPE, &e);
	memcpy(&u32, data + 8, 4);
	*status = u32;
	return ret;
}

/* EnumAdapters3: count, too-small, full list. Returns the adapter count (or -1). */
static int enum_adapters3(struct run *r, int fd, struct d3dkmt_adapterinfo *infos)
{
	struct d3dkmt_enumadapters3 e;
	int ret, n;

	memset(&e, 0, sizeof(e));
	e.filter.include_compute_only = 1;
	ret = dx(fd, LX_DXENUMADAPTERS3, &e);
	n = (int)e.adapter_count;
	EXPECT(r, LX_DXENUMADAPTERS3, "count only", ret, 0, "%d adapters", n);
	if (ret != 0)
		return -1;
	if (r->expect_adapters >= 0)
		note(r, n == r->expect_adapters, "LX_DXENUMADAPTERS3", "adapter count", n,
		     "the expected count", "expected %d", r->expect_adapters);
	if (n < 1 || n > MAX_ADAPTERS) {
		note(r, 0, "LX_DXENUMADAPTERS3", "adapter count in range", n, "1..64", NULL);
		return -1;
	}
	if (n > 1) {
		memset(&e, 0, sizeof(e));
		e.filter.include_compute_only = 1;
		e.adapter_count = 1;
		e.adapters = (void *)infos;
		ret = dx(fd, LX_DXENUMADAPTERS3, &e);
		EXPECT(r, LX_DXENUMADAPTERS3, "array of 1 for more adapters", ret, -EOVERFLOW,
		       "needs %u", e.adapter_count);
		note(r, e.adapter_count == (unsigned int)n, "LX_DXENUMADAPTERS3",
		     "count reported with EOVERFLOW", (int)e.adapter_count, "the adapter count", NULL);
	}
	memset(&e, 0, sizeof(e));
	e.filter.include_compute_only = 1;
	e.adapter_count = MAX_ADAPTERS;
	e.adapters = (void *)infos;
	ret = dx(fd, LX_DXENUMADAPTERS3, &e);
	EXPECT(r, LX_DXENUMADAPTERS3, "list", ret, 0, "%u adapters, first luid %016llx handle 0x%x",
	       e.adapter_count, luid64(infos[0].adapter_luid), infos[0].adapter_handle.v);
	if (ret != 0 || (int)e.adapter_count != n)
		return -1;
	return n;
}

/* EnumAdapters2 lists only adapters that are not compute-only: compare with EnumAdapters3. */
static void enum_adapters2(struct run *r, int fd)
{
	struct d3dkmt_enumadapters2 e2;
	struct d3dkmt_enumadapters3 e3;
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	int ret;
	unsigned int i;

	memset(&e3, 0, sizeof(e3));
	ret = dx(fd, LX_DXENUMADAPTERS3, &e3);
	EXPECT(r, LX_DXENUMADAPTERS3, "count, compute-only excluded", ret, 0, "%u adapters",
	       e3.adapter_count);

	memset(&e2, 0, sizeof(e2));
	ret = dx(fd, LX_DXENUMADAPTERS2, &e2);
	EXPECT(r, LX_DXENUMADAPTERS2, "count only", ret, 0, "%u adapters (compute-only excluded)",
	       e2.num_adapters);
	note(r, e2.num_adapters == e3.adapter_count, "LX_DXENUMADAPTERS2",
	     "same count as EnumAdapters3 without compute-only", (int)e2.num_adapters,
	     "EnumAdapters3's count", NULL);
	if (e2.num_adapters == 0 || e2.num_adapters > MAX_ADAPTERS)
		return;
	memset(infos, 0, sizeof(infos));
	e2.adapters = (void *)infos;
	ret = dx(fd, LX_DXENUMADAPTERS2, &e2);
	EXPECT(r, LX_DXENUMADAPTERS2, "list", ret, 0, "%u adapters", e2.num_adapters);
	for (i = 0; ret == 0 && i < e2.num_adapters; i++) {
		int rc = close_adapter(fd, infos[i].adapter_handle);

		EXPECT(r, LX_DXCLOSEADAPTER, "EnumAdapters2 handle", rc, 0, NULL);
	}
}

/* The adapter queries, feature/clock queries and EnumProcesses on one enumerated adapter. */
static void query_adapter(struct run *r, int fd, const struct d3dkmt_adapterinfo *info)
{
	static __thread D3DKMT_DRIVER_DESCRIPTION desc;
	D3DKMT_ADAPTERTYPE type;
	D3DKMT_QUERY_DEVICE_IDS ids;
	D3DKMT_WDDM_2_7_CAPS caps;
	struct d3dkmt_isfeatureenabled fe;
	struct d3dkmt_queryclockcalibration cc;
	struct d3dkmt_enumprocesses ep;
	__u32 pids[MAX_PIDS];
	char text[256];
	struct d3dkmthandle h = info->adapter_handle;
	unsigned int status;
	int ret, mine;
	__u64 i;

	memset(&type, 0, sizeof(type));
	ret = query_info(fd, h, KMTQAITYPE_ADAPTERTYPE, &type, sizeof(type));
	EXPECT(r, LX_DXQUERYADAPTERINFO, "KMTQAITYPE_ADAPTERTYPE", ret, 0,
	       "value 0x%x paravirtualized %u compute-only %u render %u display %u", type.Value,
	       type.Paravirtualized, type.ComputeOnly, type.RenderSupported, type.DisplaySupported);
	note(r, ret == 0 && type.Paravirtualized && !type.DisplaySupported,
	     "LX_DXQUERYADAPTERINFO", "adapter type says paravirtualized, no display", ret,
	     "Paravirtualized=1 DisplaySupported=0", NULL);

	memset(&desc, 0, sizeof(desc));
	ret = query_info(fd, h, KMTQAITYPE_DRIVER_DESCRIPTION, &desc, sizeof(desc));
	utf16_to_ascii(desc.DriverDescription, sizeof(desc.DriverDescription) / 2, text,
		       sizeof(text));
	EXPECT(r, LX_DXQUERYADAPTERINFO, "KMTQAITYPE_DRIVER_DESCRIPTION", ret, 0, "\"%s\"", text);
	note(r, ret == 0 && text[0] != 0, "LX_DXQUERYADAPTERINFO",
	     "driver description is a non-empty UTF-16 string", ret, "text", NULL);

	memset(&ids, 0, sizeof(ids));
	ids.PhysicalAdapterIndex = 0;
	ret = query_info(fd, h, KMTQAITYPE_PHYSICALADAPTERDEVICEIDS, &ids, sizeof(ids));
	EXPECT(r, LX_DXQUERYADAPTERINFO, "KMTQAITYPE_PHYSICALADAPTERDEVICEIDS", ret, 0,
	       "vendor %04x device %04x subsystem %04x:%04x revision %u", ids.DeviceIds.VendorID,
	       ids.DeviceIds.DeviceID, ids.DeviceIds.SubVendorID, ids.DeviceIds.SubSystemID,
	       ids.DeviceIds.RevisionID);
	note(r, ret == 0 && ids.DeviceIds.VendorID != 0, "LX_DXQUERYADAPTERINFO",
	     "physical adapter has a vendor id", ret, "VendorID != 0", NULL);

	memset(&caps, 0, sizeof(caps));
	ret = query_info(fd, h, KMTQAITYPE_WDDM_2_7_CAPS, &caps, sizeof(caps));
	EXPECT(r, LX_DXQUERYADAPTERINFO, "KMTQAITYPE_WDDM_2_7_CAPS", ret, 0,
	       "value 0x%x hwsch supported %u enabled %u", caps.Value, caps.HwSchSupported,
	       caps.HwSchEnabled);

	memset(&fe, 0, sizeof(fe));
	fe.adapter = h;
	fe.feature_id = _DXGK_FEATURE_HWSCH;
	ret = dx(fd, LX_ISFEATUREENABLED, &fe);
	EXPECT(r, LX_ISFEATUREENABLED, "_DXGK_FEATURE_HWSCH", ret, 0,
	       "version %u enabled %u known %u", fe.result.version, fe.result.enabled,
	       fe.result.known_feature);

	memset(&cc, 0, sizeof(cc));
	cc.adapter = h;
	cc.node_ordinal = 0;
	cc.physical_adapter_index = 0;
	ret = dx(fd, LX_DXQUERYCLOCKCALIBRATION, &cc);
	EXPECT(r, LX_DXQUERYCLOCKCALIBRATION, "node 0", ret, 0,
	       "gpu frequency %llu Hz, gpu clock %llu, cpu clock %llu",
	       (unsigned long long)cc.clock_data.gpu_frequency,
	       (unsigned long long)cc.clock_data.gpu_clock_counter,
	       (unsigned long long)cc.clock_data.cpu_clock_counter);
	note(r, ret == 0 && cc.clock_data.gpu_frequency != 0, "LX_DXQUERYCLOCKCALIBRATION",
	     "non-zero GPU frequency", ret, "gpu_frequency != 0", NULL);

	status = 0xffffffffu;
	ret = pydxg_escape(fd, h, PYDXG_ESCAPE_PING, 0, &status);
	EXPECT(r, LX_DXESCAPE, "pydxg PING", ret, 0, "status 0x%x", status);
	note(r, ret == 0 && status == 0, "LX_DXESCAPE", "PING reached the host and came back",
	     (int)status, "status 0", NULL);

	memset(&ep, 0, sizeof(ep));
	ep.adapter_luid = info->adapter_luid;
	ret = dx(fd, LX_DXENUMPROCESSES, &ep);
	EXPECT(r, LX_DXENUMPROCESSES, "NULL buffer", ret, -EOVERFLOW, "%llu processes",
	       (unsigned long long)ep.buffer_count);
	memset(&ep, 0, sizeof(ep));
	ep.adapter_luid = info->adapter_luid;
	ep.buffer = (__u64)(uintptr_t)pids;
	ep.buffer_count = MAX_PIDS;
	ret = dx(fd, LX_DXENUMPROCESSES, &ep);
	mine = 0;
	for (i = 0; ret == 0 && i < ep.buffer_count && i < MAX_PIDS; i++)
		mine |= pids[i] == (__u32)getpid();
	EXPECT(r, LX_DXENUMPROCESSES, "buffer", ret, 0, "%llu processes, this one listed: %s",
	       (unsigned long long)ep.buffer_count, mine ? "yes" : "no");
	note(r, ret == 0 && mine, "LX_DXENUMPROCESSES", "this process is listed", ret,
	     "our pid in the list", NULL);
}

/* Open by LUID, create and destroy a device and a context, close. */
static void device_and_context(struct run *r, int fd, struct winluid luid)
{
	struct d3dkmt_openadapterfromluid o;
	struct d3dkmt_createdevice cd;
	struct d3dkmt_getdevicestate gs;
	struct d3dkmt_createcontextvirtual cv;
	struct d3dkmt_destroycontext dc;
	struct d3dkmt_destroydevice dd;
	int ret;

	memset(&o, 0, sizeof(o));
	o.adapter_luid = luid;
	ret = dx(fd, LX_DXOPENADAPTERFROMLUID, &o);
	EXPECT(r, LX_DXOPENADAPTERFROMLUID, "first adapter", ret, 0, "luid %016llx -> handle 0x%x",
	       luid64(luid), o.adapter_handle.v);
	if (ret != 0)
		return;

	memset(&cd, 0, sizeof(cd));
	cd.adapter = o.adapter_handle;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(r, LX_DXCREATEDEVICE, "on the opened adapter", ret, 0, "device 0x%x", cd.device.v);
	note(r, ret != 0 || cd.device.v != 0, "LX_DXCREATEDEVICE", "device handle", ret,
	     "a non-zero handle", NULL);

	if (ret == 0) {
		memset(&gs, 0, sizeof(gs));
		gs.device = cd.device;
		gs.state_type = _D3DKMT_DEVICESTATE_EXECUTION;
		ret = dx(fd, LX_DXGETDEVICESTATE, &gs);
		EXPECT(r, LX_DXGETDEVICESTATE, "_D3DKMT_DEVICESTATE_EXECUTION", ret, 0,
		       "execution state %u", gs.execution_state);
		note(r, gs.execution_state == _D3DKMT_DEVICEEXECUTION_ACTIVE, "LX_DXGETDEVICESTATE",
		     "state is ACTIVE", (int)gs.execution_state, "_D3DKMT_DEVICEEXECUTION_ACTIVE",
		     NULL);

		memset(&cv, 0, sizeof(cv));
		cv.device = cd.device;
		cv.node_ordinal = 0;
		cv.engine_affinity = 0;
		cv.client_hint = _D3DKMT_CLIENTHINT_DX10;
		ret = dx(fd, LX_DXCREATECONTEXTVIRTUAL, &cv);
		EXPECT(r, LX_DXCREATECONTEXTVIRTUAL, "node 0", ret, 0, "context 0x%x", cv.context.v);
		if (ret == 0) {
			memset(&dc, 0, sizeof(dc));
			dc.context = cv.context;
			ret = dx(fd, LX_DXDESTROYCONTEXT, &dc);
			EXPECT(r, LX_DXDESTROYCONTEXT, "the context", ret, 0, NULL);
			ret = dx(fd, LX_DXDESTROYCONTEXT, &dc);
			EXPECT_BAD_HANDLE(r, LX_DXDESTROYCONTEXT, "again (stale handle)", ret);
		}

		memset(&dd, 0, sizeof(dd));
		dd.device = cd.device;
		ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
		EXPECT(r, LX_DXDESTROYDEVICE, "the device", ret, 0, NULL);
		ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
		EXPECT_BAD_HANDLE(r, LX_DXDESTROYDEVICE, "again (stale handle)", ret);
	}

	ret = close_adapter(fd, o.adapter_handle);
	EXPECT(r, LX_DXCLOSEADAPTER, "the opened adapter", ret, 0, NULL);
	ret = close_adapter(fd, o.adapter_handle);
	EXPECT_BAD_HANDLE(r, LX_DXCLOSEADAPTER, "again (stale handle)", ret);
}

/* Bad handles, unknown codes, NULL and bad pointers. */
static void error_paths(struct run *r, int fd, struct d3dkmthandle adapter)
{
	struct d3dkmthandle bogus = { .v = 0x7ffff00 };
	struct d3dkmt_createdevice cd;
	struct d3dkmt_openadapterfromluid o;
	struct d3dkmt_enumadapters3 e;
	D3DKMT_ADAPTERTYPE type;
	unsigned char raw[64];
	void *unmapped, *noaccess;
	int ret;

	ret = close_adapter(fd, bogus);
	EXPECT_BAD_HANDLE(r, LX_DXCLOSEADAPTER, "bad handle", ret);
	memset(&cd, 0, sizeof(cd));
	cd.adapter = bogus;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT_BAD_HANDLE(r, LX_DXCREATEDEVICE, "bad adapter handle", ret);
	ret = query_info(fd, bogus, KMTQAITYPE_ADAPTERTYPE, &type, sizeof(type));
	EXPECT_BAD_HANDLE(r, LX_DXQUERYADAPTERINFO, "bad adapter handle", ret);
	memset(&o, 0, sizeof(o));
	o.adapter_luid.a = 0x12345678;
	o.adapter_luid.b = 0x7654321;
	ret = dx(fd, LX_DXOPENADAPTERFROMLUID, &o);
	EXPECT(r, LX_DXOPENADAPTERFROMLUID, "unknown LUID", ret, -EINVAL, NULL);

	memset(raw, 0, sizeof(raw));
	ret = dx(fd, LX_DXCREATECONTEXT, raw);
	EXPECT(r, LX_DXCREATECONTEXT, "a slot without a handler", ret, -ENOTTY, NULL);
	ret = dx(fd, _IOWR(0x47, 0x3e, __u64[2]), raw);
	EXPECT(r, LX_DXENUMADAPTERS3, "wrong size bits in the code", ret, -ENOTTY, NULL);
	ret = dx(fd, _IOWR(0x47, 0x60, __u32), raw);
	EXPECT(r, _IOWR(0x47, 0x60), "number past the table", ret, -ENOTTY, NULL);
	ret = dx(fd, _IOWR('x', 0x3e, struct d3dkmt_enumadapters3), raw);
	EXPECT(r, _IOWR(x, 0x3e), "another driver's type", ret, -ENOTTY, NULL);

	ret = query_info(fd, adapter, KMTQAITYPE_ADAPTERTYPE, NULL, sizeof(type));
	EXPECT2(r, LX_DXQUERYADAPTERINFO, "NULL buffer with a size", ret, -EINVAL, -EFAULT, NULL);
	ret = query_info(fd, adapter, KMTQAITYPE_ADAPTERTYPE, &type, 0);
	EXPECT(r, LX_DXQUERYADAPTERINFO, "zero size", ret, -EINVAL, NULL);

	/* A page no one may touch: the driver's copy-to-user must fault, not crash anything. It
	 * stays reserved (PROT_NONE) while it is used: a page unmapped again could be mapped by
	 * another thread of this process meanwhile, and then the copy would rightly succeed. */
	unmapped = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (unmapped == MAP_FAILED) {
		note(r, 0, "mmap", "scratch page", -errno, "0", NULL);
		return;
	}
	noaccess = unmapped;
	ret = query_info(fd, adapter, KMTQAITYPE_ADAPTERTYPE, unmapped, sizeof(type));
	EXPECT(r, LX_DXQUERYADAPTERINFO, "unmapped buffer", ret, -EFAULT, NULL);
	memset(&e, 0, sizeof(e));
	e.filter.include_compute_only = 1;
	e.adapter_count = MAX_ADAPTERS;
	e.adapters = unmapped;
	ret = dx(fd, LX_DXENUMADAPTERS3, &e);
	EXPECT(r, LX_DXENUMADAPTERS3, "unmapped adapter array", ret, -EFAULT, NULL);
	ret = dx(fd, LX_DXENUMADAPTERS3, unmapped);
	EXPECT(r, LX_DXENUMADAPTERS3, "unmapped struct", ret, -EFAULT, NULL);
	munmap(noaccess, 4096);

	/* Not ioctls: /dev/dxg has no read, write or mmap. */
	ret = read(fd, raw, sizeof(raw)) < 0 ? -errno : 0;
	EXPECT(r, read, "of the device", ret, -EINVAL, NULL);
	unmapped = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	ret = unmapped == MAP_FAILED ? -errno : 0;
	if (unmapped != MAP_FAILED)
		munmap(unmapped, 4096);
	EXPECT(r, mmap, "of the device, shared", ret, -ENODEV, NULL);
}

/*
 * Device memory (the soft adapter's allocations, GPU virtual addresses, paging queues,
 * residency, offers and budgets). An allocation's size is in its private data: pydxg's soft
 * adapters read a 16-byte head there (dxg/uapi/memory.py): u32 magic "PDXA", u16 version 1,
 * u16 flags, u64 size in bytes (rounded up to whole pages).
 */
#define PYDXG_ALLOC_MAGIC 0x41584450u
#define PYDXG_PAGE 4096ull
#define PYDXG_ROUND(n) (((n) + PYDXG_PAGE - 1) & ~(PYDXG_PAGE - 1))
#define NT_STATUS_PENDING 259 /* STATUS_PENDING: a positive return, the call was queued */
#define MEM_RESOURCE_ALLOCS 3
#define MEM_STANDALONE_SIZE (64u << 10)
#define MEM_STANDARD_SIZE 8192u
#define MEM_VA_SIZE (1ull << 20)
#define MEM_PRIORITY 0x50000000u /* D3DDDI_ALLOCATIONPRIORITY_HIGH */

struct pydxg_alloc_desc {
	__u32 magic;
	__u16 version;
	__u16 flags;
	__u64 size;
};
_Static_assert(sizeof(struct pydxg_alloc_desc) == 16, "the soft adapter's head is 16 bytes");

/* Sizes of the resource's allocations: two not whole pages, to see them rounded. */
static const __u64 mem_resource_sizes[MEM_RESOURCE_ALLOCS] = { 5000, 16384, 1 };

struct memtest {
	struct run *r;
	int fd;
	struct d3dkmthandle adapter, device, queue, sync, resource;
	struct d3dkmthandle alloc;                         /* standalone, 64 KiB */
	struct d3dkmthandle res_allocs[MEM_RESOURCE_ALLOCS];
	struct d3dkmthandle std_alloc;                     /* standard allocation, 8 KiB */
	__u64 bytes;                                       /* page-rounded sum of all of them */
	__u64 va;                                          /* the reserved GPU VA range */
};

static const struct d3dkmthandle mem_bogus = { .v = 0x7ffff00 };

static void alloc_desc(struct pydxg_alloc_desc *d, __u64 size)
{
	memset(d, 0, sizeof(*d));
	d->magic = PYDXG_ALLOC_MAGIC;
	d->version = 1;
	d->flags = 0;
	d->size = size;
}

/* CreateAllocation of `n` allocations, each with its own 16-byte head. */
static int create_allocations(int fd, struct d3dkmthandle device, struct d3dkmthandle resource,
			      int create_resource, const __u64 *sizes, unsigned int n,
			      struct d3dddi_allocationinfo2 *infos, struct pydxg_alloc_desc *descs,
			      struct d3dkmt_createallocation *ca)
{
	unsigned int i;

	memset(infos, 0, n * sizeof(*infos));
	for (i = 0; i < n; i++) {
		alloc_desc(&descs[i], sizes[i]);
		infos[i].priv_drv_data = (void *)&descs[i];
		infos[i].priv_drv_data_size = sizeof(descs[i]);
	}
	memset(ca, 0, sizeof(*ca));
	ca->device = device;
	ca->resource = resource;
	ca->alloc_count = n;
	ca->allocation_info = (void *)infos;
	ca->flags.create_resource = create_resource ? 1 : 0;
	return dx(fd, LX_DXCREATEALLOCATION, ca);
}

static int query_vidmem(int fd, struct d3dkmthandle adapter, unsigned int group,
			struct d3dkmt_queryvideomemoryinfo *q)
{
	memset(q, 0, sizeof(*q));
	q->adapter = adapter;
	q->memory_segment_group = group;
	return dx(fd, LX_DXQUERYVIDEOMEMORYINFO, q);
}

static int change_reservation(int fd, struct d3dkmthandle adapter, unsigned int group,
			      __u64 bytes)
{
	struct d3dkmt_changevideomemoryreservation c;

	memset(&c, 0, sizeof(c));
	c.adapter = adapter;
	c.memory_segment_group = group;
	c.reservation = bytes;
	return dx(fd, LX_DXCHANGEVIDEOMEMORYRESERVATION, &c);
}

static int lock2(int fd, struct d3dkmthandle device, struct d3dkmthandle alloc, void **data)
{
	struct d3dkmt_lock2 l;
	int ret;

	memset(&l, 0, sizeof(l));
	l.device = device;
	l.allocation = alloc;
	ret = dx(fd, LX_DXLOCK2, &l);
	*data = (void *)l.data;
	return ret;
}

static int unlock2(int fd, struct d3dkmthandle device, struct d3dkmthandle alloc)
{
	struct d3dkmt_unlock2 u;

	memset(&u, 0, sizeof(u));
	u.device = device;
	u.allocation = alloc;
	return dx(fd, LX_DXUNLOCK2, &u);
}

static int reserve_va(int fd, struct d3dkmthandle adapter, __u64 base, __u64 size, __u64 *va)
{
	struct d3dddi_reservegpuvirtualaddress rv;
	int ret;

	memset(&rv, 0, sizeof(rv));
	rv.adapter = adapter;
	rv.base_address = base;
	rv.size = size;
	rv.reservation_type = _D3DDDIGPUVA_RESERVE_NO_ACCESS;
	ret = dx(fd, LX_DXRESERVEGPUVIRTUALADDRESS, &rv);
	*va = rv.virtual_address;
	return ret;
}

static int free_va(int fd, struct d3dkmthandle adapter, __u64 base, __u64 size)
{
	struct d3dkmt_freegpuvirtualaddress fv;

	memset(&fv, 0, sizeof(fv));
	fv.adapter = adapter;
	fv.base_address = base;
	fv.size = size;
	return dx(fd, LX_DXFREEGPUVIRTUALADDRESS, &fv);
}

static int update_va(int fd, struct d3dkmthandle device,
		     struct d3dddi_updategpuvirtualaddress_operation *ops, unsigned int n)
{
	struct d3dkmt_updategpuvirtualaddress u;

	memset(&u, 0, sizeof(u));
	u.device = device;
	u.num_operations = n;
	u.operations = (void *)ops;
	return dx(fd, LX_DXUPDATEGPUVIRTUALADDRESS, &u);
}

static int destroy_allocations(int fd, struct d3dkmthandle device, struct d3dkmthandle resource,
			       const struct d3dkmthandle *allocs, unsigned int n)
{
	struct d3dkmt_destroyallocation2 d;

	memset(&d, 0, sizeof(d));
	d.device = device;
	d.resource = resource;
	d.allocations = (void *)allocs;
	d.alloc_count = n;
	return dx(fd, LX_DXDESTROYALLOCATION2, &d);
}

static int query_residency(int fd, struct d3dkmthandle device, struct d3dkmthandle resource,
			   const struct d3dkmthandle *allocs, unsigned int n, __u32 *status)
{
	struct d3dkmt_queryallocationresidency q;

	memset(&q, 0, sizeof(q));
	q.device = device;
	q.resource = resource;
	q.allocations = (void *)allocs;
	q.allocation_count = n;
	q.residency_status = (void *)status;
	return dx(fd, LX_DXQUERYALLOCATIONRESIDENCY, &q);
}

/* 1. CreateAllocation: a standalone allocation, a resource of three, a standard allocation. */
static void mem_create(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createallocation ca;
	struct d3dkmt_createstandardallocation std;
	struct d3dddi_allocationinfo2 infos[MEM_RESOURCE_ALLOCS];
	struct pydxg_alloc_desc descs[MEM_RESOURCE_ALLOCS];
	__u64 size = MEM_STANDALONE_SIZE;
	unsigned int i;
	int ret, distinct;

	ret = create_allocations(t->fd, t->device, (struct d3dkmthandle){ 0 }, 0, &size, 1, infos,
				 descs, &ca);
	t->alloc = infos[0].allocation;
	EXPECT(r, LX_DXCREATEALLOCATION, "standalone, 64 KiB", ret, 0, "allocation 0x%x",
	       t->alloc.v);
	note(r, ret == 0 && t->alloc.v != 0 && ca.resource.v == 0, "LX_DXCREATEALLOCATION",
	     "standalone allocation handle, no resource", (int)t->alloc.v,
	     "a non-zero handle and resource 0", NULL);
	note(r, descs[0].magic == PYDXG_ALLOC_MAGIC && descs[0].size == MEM_STANDALONE_SIZE,
	     "LX_DXCREATEALLOCATION", "private data handed back unchanged", (int)descs[0].magic,
	     "the 16-byte head as sent", NULL);
	if (ret == 0)
		t->bytes += PYDXG_ROUND(size);

	ret = create_allocations(t->fd, t->device, (struct d3dkmthandle){ 0 }, 1,
				 mem_resource_sizes, MEM_RESOURCE_ALLOCS, infos, descs, &ca);
	t->resource = ca.resource;
	for (i = 0; i < MEM_RESOURCE_ALLOCS; i++)
		t->res_allocs[i] = infos[i].allocation;
	EXPECT(r, LX_DXCREATEALLOCATION, "create_resource with 3 allocations", ret, 0,
	       "resource 0x%x allocations 0x%x 0x%x 0x%x", ca.resource.v, infos[0].allocation.v,
	       infos[1].allocation.v, infos[2].allocation.v);
	distinct = t->res_allocs[0].v != t->res_allocs[1].v &&
		   t->res_allocs[1].v != t->res_allocs[2].v &&
		   t->res_allocs[0].v != t->res_allocs[2].v;
	for (i = 0; i < MEM_RESOURCE_ALLOCS; i++)
		distinct = distinct && t->res_allocs[i].v != 0 && t->res_allocs[i].v != t->alloc.v;
	note(r, ret == 0 && t->resource.v != 0 && distinct, "LX_DXCREATEALLOCATION",
	     "resource and its 3 allocation handles", (int)t->resource.v,
	     "non-zero, distinct handles", NULL);
	if (ret == 0)
		for (i = 0; i < MEM_RESOURCE_ALLOCS; i++)
			t->bytes += PYDXG_ROUND(mem_resource_sizes[i]);

	memset(&std, 0, sizeof(std));
	std.type = _D3DKMT_STANDARDALLOCATIONTYPE_EXISTINGHEAP;
	std.existing_heap_data.size = MEM_STANDARD_SIZE;
	memset(infos, 0, sizeof(infos));
	memset(&ca, 0, sizeof(ca));
	ca.device = t->device;
	ca.standard_allocation = (void *)&std;
	ca.priv_drv_data_size = 0;
	ca.alloc_count = 1;
	ca.allocation_info = (void *)infos;
	ca.flags.standard_allocation = 1;
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	t->std_alloc = infos[0].allocation;
	EXPECT(r, LX_DXCREATEALLOCATION, "standard allocation, EXISTINGHEAP 8 KiB", ret, 0,
	       "allocation 0x%x", t->std_alloc.v);
	note(r, ret == 0 && t->std_alloc.v != 0, "LX_DXCREATEALLOCATION",
	     "standard allocation handle", (int)t->std_alloc.v, "a non-zero handle", NULL);
	if (ret == 0)
		t->bytes += MEM_STANDARD_SIZE;

	/* The same heap size, not whole pages: refused. */
	std.existing_heap_data.size = MEM_STANDARD_SIZE + 1;
	memset(infos, 0, sizeof(infos));
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "standard allocation of 8193 bytes", ret, -EINVAL, NULL);
}

/* Counts, bad handles and bad private data for CreateAllocation. */
static void mem_create_errors(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createallocation ca;
	struct d3dddi_allocationinfo2 infos[1];
	struct pydxg_alloc_desc descs[1];
	__u64 size = PYDXG_PAGE;
	int ret;

	ret = create_allocations(t->fd, mem_bogus, (struct d3dkmthandle){ 0 }, 0, &size, 1, infos,
				 descs, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "bad device handle", ret, -EBADF, NULL);
	ret = create_allocations(t->fd, t->device, mem_bogus, 0, &size, 1, infos, descs, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "bad resource handle", ret, -EBADF, NULL);
	ca.resource.v = 0; /* from here on a valid request but for what each check changes */
	ca.alloc_count = 0;
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "alloc_count 0", ret, -EINVAL, NULL);
	ca.alloc_count = D3DKMT_CREATEALLOCATION_MAX + 1;
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "alloc_count 1025", ret, -EINVAL, NULL);

	alloc_desc(&descs[0], PYDXG_PAGE);
	descs[0].magic = 0x12345678;
	ca.alloc_count = 1;
	memset(infos, 0, sizeof(infos));
	infos[0].priv_drv_data = (void *)&descs[0];
	infos[0].priv_drv_data_size = sizeof(descs[0]);
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "private data with a wrong magic", ret, -EINVAL, NULL);
	alloc_desc(&descs[0], 0);
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "private data of size 0", ret, -EINVAL, NULL);
}

/* 2. Lock2 cannot map through a file; Unlock2 of what is not locked. */
static void mem_lock(struct memtest *t)
{
	struct run *r = t->r;
	void *data = NULL;
	int ret;

	ret = lock2(t->fd, t->device, t->alloc, &data);
	EXPECT(r, LX_DXLOCK2, "through the file (cannot map into the caller)", ret, -EOPNOTSUPP,
	       NULL);
	ret = lock2(t->fd, t->device, t->alloc, &data);
	EXPECT(r, LX_DXLOCK2, "again", ret, -EOPNOTSUPP, NULL);
	ret = lock2(t->fd, t->device, mem_bogus, &data);
	EXPECT(r, LX_DXLOCK2, "bad allocation handle", ret, -EBADF, NULL);
	ret = lock2(t->fd, mem_bogus, t->alloc, &data);
	EXPECT(r, LX_DXLOCK2, "bad device handle", ret, -EBADF, NULL);
	ret = unlock2(t->fd, t->device, t->alloc);
	EXPECT(r, LX_DXUNLOCK2, "an allocation not locked", ret, -EINVAL, NULL);
	ret = unlock2(t->fd, t->device, mem_bogus);
	EXPECT(r, LX_DXUNLOCK2, "bad allocation handle", ret, -EBADF, NULL);
}

/* 3. Budgets and reservations. `before` is the usage before anything was allocated. */
static void mem_budget(struct memtest *t, __u64 before)
{
	struct run *r = t->r;
	struct d3dkmt_queryvideomemoryinfo q;
	struct d3dkmt_changevideomemoryreservation c;
	int ret;

	ret = query_vidmem(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "local group", ret, 0,
	       "budget %llu usage %llu reservation %llu available %llu",
	       (unsigned long long)q.budget, (unsigned long long)q.current_usage,
	       (unsigned long long)q.current_reservation,
	       (unsigned long long)q.available_for_reservation);
	note(r, ret == 0 && q.budget > 0, "LX_DXQUERYVIDEOMEMORYINFO", "budget", ret,
	     "budget > 0", NULL);
	note(r, ret == 0 && q.current_usage >= before + t->bytes, "LX_DXQUERYVIDEOMEMORYINFO",
	     "usage counts the allocations, page-rounded", (int)q.current_usage,
	     "usage >= what was allocated", "usage %llu, %llu before, %llu allocated",
	     (unsigned long long)q.current_usage, (unsigned long long)before,
	     (unsigned long long)t->bytes);
	note(r, ret == 0 && q.available_for_reservation >= MEM_VA_SIZE,
	     "LX_DXQUERYVIDEOMEMORYINFO", "room for a 1 MiB reservation",
	     (int)(q.available_for_reservation >> 20), "available_for_reservation >= 1 MiB",
	     NULL);

	ret = query_vidmem(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_NON_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "non-local group", ret, 0,
	       "budget %llu usage %llu", (unsigned long long)q.budget,
	       (unsigned long long)q.current_usage);

	ret = change_reservation(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL,
				 MEM_VA_SIZE);
	EXPECT(r, LX_DXCHANGEVIDEOMEMORYRESERVATION, "1 MiB in the local group", ret, 0, NULL);
	ret = query_vidmem(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "after the reservation", ret, 0,
	       "reservation %llu", (unsigned long long)q.current_reservation);
	note(r, ret == 0 && q.current_reservation == MEM_VA_SIZE, "LX_DXQUERYVIDEOMEMORYINFO",
	     "current_reservation is 1 MiB", (int)q.current_reservation, "1048576", NULL);
	if (ret == 0) {
		ret = change_reservation(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL,
					 q.available_for_reservation + (64ull << 20));
		note(r, ret < 0, "LX_DXCHANGEVIDEOMEMORYRESERVATION",
		     "more than available_for_reservation", ret, "an error", NULL);
	}
	ret = change_reservation(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, 0);
	EXPECT(r, LX_DXCHANGEVIDEOMEMORYRESERVATION, "back to 0", ret, 0, NULL);
	ret = query_vidmem(t->fd, t->adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	note(r, ret == 0 && q.current_reservation == 0, "LX_DXQUERYVIDEOMEMORYINFO",
	     "current_reservation back to 0", (int)q.current_reservation, "0", NULL);

	ret = query_vidmem(t->fd, t->adapter, 2, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "segment group 2", ret, -EINVAL, NULL);
	ret = change_reservation(t->fd, t->adapter, 2, MEM_VA_SIZE);
	EXPECT(r, LX_DXCHANGEVIDEOMEMORYRESERVATION, "segment group 2", ret, -EINVAL, NULL);
	ret = query_vidmem(t->fd, mem_bogus, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "bad adapter handle", ret, -EBADF, NULL);
	ret = change_reservation(t->fd, mem_bogus, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, 0);
	EXPECT(r, LX_DXCHANGEVIDEOMEMORYRESERVATION, "bad adapter handle", ret, -EBADF, NULL);
	memset(&q, 0, sizeof(q));
	q.adapter = t->adapter;
	q.process = 1;
	ret = dx(t->fd, LX_DXQUERYVIDEOMEMORYINFO, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "another process", ret, -EINVAL, NULL);
	memset(&c, 0, sizeof(c));
	c.adapter = t->adapter;
	c.process = 1;
	ret = dx(t->fd, LX_DXCHANGEVIDEOMEMORYRESERVATION, &c);
	EXPECT(r, LX_DXCHANGEVIDEOMEMORYRESERVATION, "another process", ret, -EINVAL, NULL);
}

/* 4. A paging queue (its fence page cannot be mapped through the file). */
static void mem_paging_queue(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createpagingqueue pq;
	int ret;

	memset(&pq, 0, sizeof(pq));
	pq.device = t->device;
	pq.priority = _D3DDDI_PAGINGQUEUE_PRIORITY_NORMAL;
	ret = dx(t->fd, LX_DXCREATEPAGINGQUEUE, &pq);
	t->queue = pq.paging_queue;
	t->sync = pq.sync_object;
	EXPECT(r, LX_DXCREATEPAGINGQUEUE, "normal priority", ret, 0,
	       "queue 0x%x sync object 0x%x fence at %p", pq.paging_queue.v, pq.sync_object.v,
	       (void *)pq.fence_cpu_virtual_address);
	note(r, ret == 0 && pq.paging_queue.v != 0 && pq.sync_object.v != 0 &&
		     pq.paging_queue.v != pq.sync_object.v, "LX_DXCREATEPAGINGQUEUE",
	     "queue and sync object handles", ret, "two distinct non-zero handles", NULL);
	note(r, pq.fence_cpu_virtual_address == NULL, "LX_DXCREATEPAGINGQUEUE",
	     "no fence mapping through the file", 0, "fence_cpu_virtual_address NULL", NULL);

	memset(&pq, 0, sizeof(pq));
	pq.device = mem_bogus;
	ret = dx(t->fd, LX_DXCREATEPAGINGQUEUE, &pq);
	EXPECT(r, LX_DXCREATEPAGINGQUEUE, "bad device handle", ret, -EBADF, NULL);
	memset(&pq, 0, sizeof(pq));
	pq.device = t->device;
	pq.physical_adapter_index = 1;
	ret = dx(t->fd, LX_DXCREATEPAGINGQUEUE, &pq);
	EXPECT(r, LX_DXCREATEPAGINGQUEUE, "physical adapter 1", ret, -EINVAL, NULL);
}

/* 4. Reserve, map, unmap and free GPU virtual addresses. */
static void mem_va(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dddi_mapgpuvirtualaddress mg;
	struct d3dddi_updategpuvirtualaddress_operation op;
	__u64 va = 0, other = 0;
	int ret;

	ret = reserve_va(t->fd, t->adapter, 0, MEM_VA_SIZE, &va);
	EXPECT2(r, LX_DXRESERVEGPUVIRTUALADDRESS, "1 MiB anywhere", ret, 0, NT_STATUS_PENDING,
		"va 0x%llx", (unsigned long long)va);
	note(r, ret >= 0 && va != 0 && va % PYDXG_PAGE == 0, "LX_DXRESERVEGPUVIRTUALADDRESS",
	     "a page-aligned VA", (int)(va & 0xfff), "non-zero and page-aligned",
	     "va 0x%llx", (unsigned long long)va);
	if (ret < 0 || va == 0)
		return;
	t->va = va;

	ret = reserve_va(t->fd, t->adapter, va, MEM_VA_SIZE, &other);
	note(r, ret < 0, "LX_DXRESERVEGPUVIRTUALADDRESS", "the same range again", ret,
	     "an error", "va 0x%llx", (unsigned long long)other);
	ret = reserve_va(t->fd, t->adapter, va + 1, MEM_VA_SIZE, &other);
	EXPECT(r, LX_DXRESERVEGPUVIRTUALADDRESS, "misaligned base", ret, -EINVAL, NULL);
	ret = reserve_va(t->fd, mem_bogus, 0, MEM_VA_SIZE, &other);
	EXPECT(r, LX_DXRESERVEGPUVIRTUALADDRESS, "bad adapter handle", ret, -EBADF, NULL);

	memset(&mg, 0, sizeof(mg));
	mg.paging_queue = t->queue;
	mg.base_address = va;
	mg.allocation = t->alloc;
	mg.offset_in_pages = 0;
	mg.size_in_pages = MEM_STANDALONE_SIZE / PYDXG_PAGE;
	mg.protection.write = 1;
	ret = dx(t->fd, LX_DXMAPGPUVIRTUALADDRESS, &mg);
	EXPECT2(r, LX_DXMAPGPUVIRTUALADDRESS, "the allocation at the reserved VA", ret, 0,
		NT_STATUS_PENDING, "va 0x%llx fence %llu",
		(unsigned long long)mg.virtual_address, (unsigned long long)mg.paging_fence_value);
	note(r, ret >= 0 && mg.virtual_address == va, "LX_DXMAPGPUVIRTUALADDRESS",
	     "mapped where asked", ret, "virtual_address == the reserved VA", NULL);
	mg.allocation = mem_bogus;
	ret = dx(t->fd, LX_DXMAPGPUVIRTUALADDRESS, &mg);
	EXPECT(r, LX_DXMAPGPUVIRTUALADDRESS, "bad allocation handle", ret, -EBADF, NULL);
	mg.allocation = t->alloc;
	mg.paging_queue = mem_bogus;
	ret = dx(t->fd, LX_DXMAPGPUVIRTUALADDRESS, &mg);
	EXPECT(r, LX_DXMAPGPUVIRTUALADDRESS, "bad paging queue handle", ret, -EBADF, NULL);

	memset(&op, 0, sizeof(op));
	op.operation = _D3DDDI_UPDATEGPUVIRTUALADDRESS_UNMAP;
	op.unmap.base_address = va;
	op.unmap.size = MEM_STANDALONE_SIZE;
	ret = update_va(t->fd, t->device, &op, 1);
	EXPECT(r, LX_DXUPDATEGPUVIRTUALADDRESS, "UNMAP the mapping", ret, 0, NULL);
	ret = update_va(t->fd, t->device, &op, 0);
	EXPECT(r, LX_DXUPDATEGPUVIRTUALADDRESS, "no operations", ret, -EINVAL, NULL);
	ret = update_va(t->fd, mem_bogus, &op, 1);
	EXPECT(r, LX_DXUPDATEGPUVIRTUALADDRESS, "bad device handle", ret, -EBADF, NULL);
	memset(&op, 0, sizeof(op));
	op.operation = _D3DDDI_UPDATEGPUVIRTUALADDRESS_MAP;
	op.map.base_address = va;
	op.map.size = MEM_STANDALONE_SIZE;
	op.map.allocation = mem_bogus;
	op.map.allocation_size = MEM_STANDALONE_SIZE;
	ret = update_va(t->fd, t->device, &op, 1);
	EXPECT(r, LX_DXUPDATEGPUVIRTUALADDRESS, "MAP of a bad allocation handle", ret, -EBADF,
	       NULL);
	op.operation = 7;
	ret = update_va(t->fd, t->device, &op, 1);
	EXPECT(r, LX_DXUPDATEGPUVIRTUALADDRESS, "operation 7", ret, -EINVAL, NULL);

	ret = free_va(t->fd, t->adapter, va, MEM_VA_SIZE);
	EXPECT(r, LX_DXFREEGPUVIRTUALADDRESS, "the reservation", ret, 0, NULL);
	ret = free_va(t->fd, t->adapter, va, MEM_VA_SIZE);
	EXPECT(r, LX_DXFREEGPUVIRTUALADDRESS, "again (nothing reserved)", ret, -EINVAL, NULL);
	ret = free_va(t->fd, mem_bogus, va, MEM_VA_SIZE);
	EXPECT(r, LX_DXFREEGPUVIRTUALADDRESS, "bad adapter handle", ret, -EBADF, NULL);
	t->va = 0;
}

static int residency_ok(const __u32 *status, unsigned int n, int resident)
{
	unsigned int i;

	for (i = 0; i < n; i++) {
		if (resident && status[i] != _D3DKMT_ALLOCATIONRESIDENCYSTATUS_RESIDENTINGPUMEMORY &&
		    status[i] != _D3DKMT_ALLOCATIONRESIDENCYSTATUS_RESIDENTINSHAREDMEMORY)
			return 0;
		if (!resident && status[i] != _D3DKMT_ALLOCATIONRESIDENCYSTATUS_NOTRESIDENT)
			return 0;
	}
	return 1;
}

/* 5. Residency: evict, query, make resident, query. */
static void mem_residency(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmthandle list[2] = { t->alloc, t->std_alloc };
	struct d3dddi_makeresident mr;
	struct d3dkmt_evict ev;
	__u32 status[MEM_RESOURCE_ALLOCS];
	int ret;

	memset(status, 0xff, sizeof(status));
	ret = query_residency(t->fd, t->device, (struct d3dkmthandle){ 0 }, list, 2, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "two new allocations", ret, 0,
	       "status %u %u", status[0], status[1]);
	note(r, ret == 0 && residency_ok(status, 2, 1), "LX_DXQUERYALLOCATIONRESIDENCY",
	     "new allocations are resident", (int)status[0], "RESIDENTIN*MEMORY", NULL);

	memset(&ev, 0, sizeof(ev));
	ev.device = t->device;
	ev.alloc_count = 2;
	ev.allocations = (void *)list;
	ret = dx(t->fd, LX_DXEVICT, &ev);
	EXPECT(r, LX_DXEVICT, "two allocations", ret, 0, "bytes to trim %llu",
	       (unsigned long long)ev.num_bytes_to_trim);
	memset(status, 0xff, sizeof(status));
	ret = query_residency(t->fd, t->device, (struct d3dkmthandle){ 0 }, list, 2, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "after Evict", ret, 0, "status %u %u",
	       status[0], status[1]);
	note(r, ret == 0 && residency_ok(status, 2, 0), "LX_DXQUERYALLOCATIONRESIDENCY",
	     "evicted allocations are not resident", (int)status[0], "NOTRESIDENT", NULL);

	memset(&mr, 0, sizeof(mr));
	mr.paging_queue = t->queue;
	mr.alloc_count = 2;
	mr.allocation_list = (void *)list;
	ret = dx(t->fd, LX_DXMAKERESIDENT, &mr);
	EXPECT2(r, LX_DXMAKERESIDENT, "two allocations", ret, 0, NT_STATUS_PENDING,
		"paging fence %llu, bytes to trim %llu", (unsigned long long)mr.paging_fence_value,
		(unsigned long long)mr.num_bytes_to_trim);
	memset(status, 0xff, sizeof(status));
	ret = query_residency(t->fd, t->device, (struct d3dkmthandle){ 0 }, list, 2, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "after MakeResident", ret, 0, "status %u %u",
	       status[0], status[1]);
	note(r, ret == 0 && residency_ok(status, 2, 1), "LX_DXQUERYALLOCATIONRESIDENCY",
	     "resident again", (int)status[0], "RESIDENTIN*MEMORY", NULL);

	/* By resource (allocation_count 0): the real driver writes one status, the resource's as
	 * a whole (dxgvmb_send_query_alloc_residency); pydxg writes one per allocation of the
	 * resource. The array has room for either; the first must say resident. */
	memset(status, 0xff, sizeof(status));
	ret = query_residency(t->fd, t->device, t->resource, NULL, 0, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "the resource", ret, 0, "status %u", status[0]);
	note(r, ret == 0 && residency_ok(status, 1, 1), "LX_DXQUERYALLOCATIONRESIDENCY",
	     "the resource as a whole is resident", ret, "RESIDENTIN*MEMORY", "status %u",
	     status[0]);
	ret = query_residency(t->fd, t->device, t->resource, t->res_allocs, MEM_RESOURCE_ALLOCS,
			      status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "a resource and allocations", ret, -EINVAL, NULL);

	/* Errors: counts and handles. */
	mr.alloc_count = 0;
	ret = dx(t->fd, LX_DXMAKERESIDENT, &mr);
	EXPECT(r, LX_DXMAKERESIDENT, "alloc_count 0", ret, -EINVAL, NULL);
	mr.alloc_count = D3DKMT_MAKERESIDENT_ALLOC_MAX + 1;
	ret = dx(t->fd, LX_DXMAKERESIDENT, &mr);
	EXPECT(r, LX_DXMAKERESIDENT, "alloc_count 10241", ret, -EINVAL, NULL);
	mr.alloc_count = 2;
	mr.paging_queue = mem_bogus;
	ret = dx(t->fd, LX_DXMAKERESIDENT, &mr);
	EXPECT(r, LX_DXMAKERESIDENT, "bad paging queue handle", ret, -EBADF, NULL);
	list[1] = mem_bogus;
	mr.paging_queue = t->queue;
	ret = dx(t->fd, LX_DXMAKERESIDENT, &mr);
	EXPECT(r, LX_DXMAKERESIDENT, "bad allocation handle in the list", ret, -EBADF, NULL);
	ret = dx(t->fd, LX_DXEVICT, &ev);
	EXPECT(r, LX_DXEVICT, "bad allocation handle in the list", ret, -EBADF, NULL);
	ev.alloc_count = 0;
	ret = dx(t->fd, LX_DXEVICT, &ev);
	EXPECT(r, LX_DXEVICT, "alloc_count 0", ret, -EINVAL, NULL);
	ev.alloc_count = 1;
	ev.device = mem_bogus;
	ret = dx(t->fd, LX_DXEVICT, &ev);
	EXPECT(r, LX_DXEVICT, "bad device handle", ret, -EBADF, NULL);
	ret = query_residency(t->fd, t->device, (struct d3dkmthandle){ 0 }, list, 2, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "bad allocation handle in the list", ret, -EBADF,
	       NULL);
	ret = query_residency(t->fd, t->device, (struct d3dkmthandle){ 0 }, list, 0, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "allocation_count 0", ret, -EINVAL, NULL);
	ret = query_residency(t->fd, t->device, mem_bogus, NULL, 0, status);
	EXPECT(r, LX_DXQUERYALLOCATIONRESIDENCY, "bad resource handle", ret, -EBADF, NULL);
}

/* 5. Priorities: set, get back; per allocation and per resource. */
static void mem_priority(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmthandle list[2] = { t->alloc, t->std_alloc };
	struct d3dkmt_setallocationpriority sp;
	struct d3dkmt_getallocationpriority gp;
	__u32 set[2] = { MEM_PRIORITY, MEM_PRIORITY + 1 }, got[2] = { 0, 0 };
	__u32 rset = MEM_PRIORITY + 2, rgot = 0;
	int ret;

	memset(&sp, 0, sizeof(sp));
	sp.device = t->device;
	sp.allocation_list = (void *)list;
	sp.allocation_count = 2;
	sp.priorities = (void *)set;
	ret = dx(t->fd, LX_DXSETALLOCATIONPRIORITY, &sp);
	EXPECT(r, LX_DXSETALLOCATIONPRIORITY, "two allocations", ret, 0, "0x%x 0x%x", set[0],
	       set[1]);
	memset(&gp, 0, sizeof(gp));
	gp.device = t->device;
	gp.allocation_list = (void *)list;
	gp.allocation_count = 2;
	gp.priorities = (void *)got;
	ret = dx(t->fd, LX_DXGETALLOCATIONPRIORITY, &gp);
	EXPECT(r, LX_DXGETALLOCATIONPRIORITY, "two allocations", ret, 0, "0x%x 0x%x", got[0],
	       got[1]);
	note(r, ret == 0 && got[0] == set[0] && got[1] == set[1], "LX_DXGETALLOCATIONPRIORITY",
	     "the priorities set", (int)got[0], "what SetAllocationPriority set", NULL);

	memset(&sp, 0, sizeof(sp));
	sp.device = t->device;
	sp.resource = t->resource;
	sp.priorities = (void *)&rset;
	ret = dx(t->fd, LX_DXSETALLOCATIONPRIORITY, &sp);
	EXPECT(r, LX_DXSETALLOCATIONPRIORITY, "the resource", ret, 0, "0x%x", rset);
	memset(&gp, 0, sizeof(gp));
	gp.device = t->device;
	gp.resource = t->resource;
	gp.priorities = (void *)&rgot;
	ret = dx(t->fd, LX_DXGETALLOCATIONPRIORITY, &gp);
	EXPECT(r, LX_DXGETALLOCATIONPRIORITY, "the resource", ret, 0, "0x%x", rgot);
	note(r, ret == 0 && rgot == rset, "LX_DXGETALLOCATIONPRIORITY",
	     "the resource's priority set", (int)rgot, "what SetAllocationPriority set", NULL);

	list[1] = mem_bogus;
	memset(&sp, 0, sizeof(sp));
	sp.device = t->device;
	sp.allocation_list = (void *)list;
	sp.allocation_count = 2;
	sp.priorities = (void *)set;
	ret = dx(t->fd, LX_DXSETALLOCATIONPRIORITY, &sp);
	EXPECT(r, LX_DXSETALLOCATIONPRIORITY, "bad allocation handle", ret, -EBADF, NULL);
	sp.allocation_count = 0;
	ret = dx(t->fd, LX_DXSETALLOCATIONPRIORITY, &sp);
	EXPECT(r, LX_DXSETALLOCATIONPRIORITY, "allocation_count 0", ret, -EINVAL, NULL);
	gp.resource = mem_bogus;
	ret = dx(t->fd, LX_DXGETALLOCATIONPRIORITY, &gp);
	EXPECT(r, LX_DXGETALLOCATIONPRIORITY, "bad resource handle", ret, -EBADF, NULL);
}

/* 5. Offer the standard allocation and the resource, reclaim them. */
static void mem_offer(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dkmt_offerallocations of;
	struct d3dkmt_reclaimallocations2 rc;
	struct d3dkmthandle bad = mem_bogus;
	__u32 results[1];
	void *data = NULL;
	int ret;

	memset(&of, 0, sizeof(of));
	of.device = t->device;
	of.allocations = (void *)&t->std_alloc;
	of.allocation_count = 1;
	of.priority = _D3DKMT_OFFER_PRIORITY_NORMAL;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "the standard allocation", ret, 0, NULL);
	ret = lock2(t->fd, t->device, t->std_alloc, &data);
	EXPECT(r, LX_DXLOCK2, "an offered allocation", ret, -EINVAL, NULL);

	memset(&of, 0, sizeof(of));
	of.device = t->device;
	of.resources = (void *)&t->resource;
	of.allocation_count = 1;
	of.priority = _D3DKMT_OFFER_PRIORITY_LOW;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "the resource", ret, 0, NULL);

	memset(&rc, 0, sizeof(rc));
	rc.paging_queue = t->queue;
	rc.allocation_count = 1;
	rc.allocations = (void *)&t->std_alloc;
	results[0] = 0xffffffffu;
	rc.results = (void *)results;
	ret = dx(t->fd, LX_DXRECLAIMALLOCATIONS2, &rc);
	EXPECT2(r, LX_DXRECLAIMALLOCATIONS2, "the standard allocation", ret, 0,
		NT_STATUS_PENDING, "result %u, paging fence %llu", results[0],
		(unsigned long long)rc.paging_fence_value);
	note(r, ret >= 0 && (results[0] == _D3DDDI_RECLAIM_RESULT_OK ||
			     results[0] == _D3DDDI_RECLAIM_RESULT_DISCARDED),
	     "LX_DXRECLAIMALLOCATIONS2", "result of the allocation", (int)results[0],
	     "_D3DDDI_RECLAIM_RESULT_OK or _DISCARDED", NULL);

	memset(&rc, 0, sizeof(rc));
	rc.paging_queue = t->queue;
	rc.allocation_count = 1;
	rc.resources = (void *)&t->resource;
	results[0] = 0xffffffffu;
	rc.results = (void *)results;
	ret = dx(t->fd, LX_DXRECLAIMALLOCATIONS2, &rc);
	EXPECT2(r, LX_DXRECLAIMALLOCATIONS2, "the resource", ret, 0, NT_STATUS_PENDING,
		"result %u", results[0]);
	note(r, ret >= 0 && (results[0] == _D3DDDI_RECLAIM_RESULT_OK ||
			     results[0] == _D3DDDI_RECLAIM_RESULT_DISCARDED),
	     "LX_DXRECLAIMALLOCATIONS2", "result of the resource", (int)results[0],
	     "_D3DDDI_RECLAIM_RESULT_OK or _DISCARDED", NULL);

	/* Errors. */
	memset(&of, 0, sizeof(of));
	of.device = t->device;
	of.allocations = (void *)&t->std_alloc;
	of.resources = (void *)&t->resource;
	of.allocation_count = 1;
	of.priority = _D3DKMT_OFFER_PRIORITY_NORMAL;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "resources and allocations at once", ret, -EINVAL, NULL);
	of.resources = NULL;
	of.allocation_count = 0;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "allocation_count 0", ret, -EINVAL, NULL);
	of.allocation_count = 1;
	of.allocations = (void *)&bad;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "bad allocation handle", ret, -EBADF, NULL);
	of.allocations = (void *)&t->std_alloc;
	of.device = mem_bogus;
	ret = dx(t->fd, LX_DXOFFERALLOCATIONS, &of);
	EXPECT(r, LX_DXOFFERALLOCATIONS, "bad device handle", ret, -EBADF, NULL);
	memset(&rc, 0, sizeof(rc));
	rc.paging_queue = mem_bogus;
	rc.allocation_count = 1;
	rc.allocations = (void *)&t->std_alloc;
	rc.results = (void *)results;
	ret = dx(t->fd, LX_DXRECLAIMALLOCATIONS2, &rc);
	EXPECT(r, LX_DXRECLAIMALLOCATIONS2, "bad paging queue handle", ret, -EBADF, NULL);
	rc.paging_queue = t->queue;
	rc.allocations = (void *)&bad;
	ret = dx(t->fd, LX_DXRECLAIMALLOCATIONS2, &rc);
	EXPECT(r, LX_DXRECLAIMALLOCATIONS2, "bad allocation handle", ret, -EBADF, NULL);
}

/* 5. UpdateAllocProperty and FlushHeapTransitions. */
static void mem_properties(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dddi_updateallocproperty up;
	struct d3dkmt_flushheaptransitions fh;
	int ret;

	memset(&up, 0, sizeof(up));
	up.paging_queue = t->queue;
	up.allocation = t->alloc;
	up.set_accessed_physically = 1;
	up.flags.accessed_physically = 1;
	ret = dx(t->fd, LX_DXUPDATEALLOCPROPERTY, &up);
	EXPECT2(r, LX_DXUPDATEALLOCPROPERTY, "accessed_physically", ret, 0, NT_STATUS_PENDING,
		"paging fence %llu", (unsigned long long)up.paging_fence_value);
	up.allocation = mem_bogus;
	ret = dx(t->fd, LX_DXUPDATEALLOCPROPERTY, &up);
	EXPECT(r, LX_DXUPDATEALLOCPROPERTY, "bad allocation handle", ret, -EBADF, NULL);
	up.allocation = t->alloc;
	up.paging_queue = mem_bogus;
	ret = dx(t->fd, LX_DXUPDATEALLOCPROPERTY, &up);
	EXPECT(r, LX_DXUPDATEALLOCPROPERTY, "bad paging queue handle", ret, -EBADF, NULL);

	memset(&fh, 0, sizeof(fh));
	fh.adapter = t->adapter;
	ret = dx(t->fd, LX_DXFLUSHHEAPTRANSITIONS, &fh);
	EXPECT(r, LX_DXFLUSHHEAPTRANSITIONS, "the adapter", ret, 0, NULL);
	fh.adapter = mem_bogus;
	ret = dx(t->fd, LX_DXFLUSHHEAPTRANSITIONS, &fh);
	EXPECT(r, LX_DXFLUSHHEAPTRANSITIONS, "bad adapter handle", ret, -EBADF, NULL);
}

/* 5. DestroyPagingQueue, DestroyAllocation2 (the list, then the resource). */
static void mem_destroy(struct memtest *t)
{
	struct run *r = t->r;
	struct d3dddi_destroypagingqueue dq;
	struct d3dkmthandle none = { 0 };
	struct d3dkmthandle list[2] = { t->alloc, t->std_alloc };
	struct d3dkmthandle dup[2] = { t->alloc, t->alloc };
	int ret;

	memset(&dq, 0, sizeof(dq));
	dq.paging_queue = t->queue;
	ret = dx(t->fd, LX_DXDESTROYPAGINGQUEUE, &dq);
	EXPECT(r, LX_DXDESTROYPAGINGQUEUE, "the queue", ret, 0, NULL);
	ret = dx(t->fd, LX_DXDESTROYPAGINGQUEUE, &dq);
	EXPECT(r, LX_DXDESTROYPAGINGQUEUE, "again (stale handle)", ret, -EBADF, NULL);

	ret = destroy_allocations(t->fd, t->device, none, NULL, 0);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "neither resource nor allocations", ret, -EINVAL,
	       NULL);
	ret = destroy_allocations(t->fd, t->device, t->resource, list, 2);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "a resource and allocations", ret, -EINVAL, NULL);
	ret = destroy_allocations(t->fd, t->device, none, list, D3DKMT_CREATEALLOCATION_MAX + 1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "alloc_count 1025", ret, -EINVAL, NULL);
	ret = destroy_allocations(t->fd, t->device, none, dup, 2);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "one allocation twice", ret, -EINVAL, NULL);
	ret = destroy_allocations(t->fd, t->device, none, &t->res_allocs[0], 1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "an allocation of a resource alone", ret, -EINVAL,
	       NULL);
	ret = destroy_allocations(t->fd, t->device, none, &mem_bogus, 1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "bad allocation handle", ret, -EBADF, NULL);
	ret = destroy_allocations(t->fd, mem_bogus, none, list, 2);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "bad device handle", ret, -EBADF, NULL);

	ret = destroy_allocations(t->fd, t->device, none, list, 2);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "the standalone and the standard allocation", ret, 0,
	       NULL);
	ret = destroy_allocations(t->fd, t->device, none, list, 1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "again (stale handle)", ret, -EBADF, NULL);
	ret = destroy_allocations(t->fd, t->device, t->resource, NULL, 0);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "the resource", ret, 0, NULL);
	ret = destroy_allocations(t->fd, t->device, t->resource, NULL, 0);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "the resource again (stale handle)", ret, -EBADF,
	       NULL);
	ret = destroy_allocations(t->fd, t->device, none, &t->res_allocs[1], 1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "an allocation of the destroyed resource", ret,
	       -EBADF, NULL);
}

/* The whole memory test on one adapter: a device, its memory, and everything gone again. */
static void memory(struct run *r, int fd, struct d3dkmthandle adapter)
{
	struct memtest t;
	struct d3dkmt_createdevice cd;
	struct d3dkmt_destroydevice dd;
	struct d3dkmt_queryvideomemoryinfo q;
	__u64 before = 0;
	int ret;

	memset(&t, 0, sizeof(t));
	t.r = r;
	t.fd = fd;
	t.adapter = adapter;
	ret = query_vidmem(fd, adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "before any allocation", ret, 0, "usage %llu",
	       (unsigned long long)q.current_usage);
	if (ret == 0)
		before = q.current_usage;

	memset(&cd, 0, sizeof(cd));
	cd.adapter = adapter;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(r, LX_DXCREATEDEVICE, "for device memory", ret, 0, "device 0x%x", cd.device.v);
	if (ret != 0)
		return;
	t.device = cd.device;

	mem_create(&t);
	mem_create_errors(&t);
	mem_lock(&t);
	mem_budget(&t, before);
	mem_paging_queue(&t);
	mem_va(&t);
	mem_residency(&t);
	mem_priority(&t);
	mem_offer(&t);
	mem_properties(&t);
	mem_destroy(&t);

	ret = query_vidmem(fd, adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	EXPECT(r, LX_DXQUERYVIDEOMEMORYINFO, "after DestroyAllocation2", ret, 0, "usage %llu",
	       (unsigned long long)q.current_usage);
	note(r, ret == 0 && q.current_usage == before, "LX_DXQUERYVIDEOMEMORYINFO",
	     "the memory is given back", (int)q.current_usage, "the usage from before",
	     "usage %llu, %llu before", (unsigned long long)q.current_usage,
	     (unsigned long long)before);

	memset(&dd, 0, sizeof(dd));
	dd.device = t.device;
	ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
	EXPECT(r, LX_DXDESTROYDEVICE, "the device with memory", ret, 0, NULL);
}

/* A device left with allocations, a resource and a paging queue: DestroyDevice takes them. */
static void memory_left_to_the_device(struct run *r, int fd, struct d3dkmthandle adapter)
{
	struct d3dkmt_createdevice cd;
	struct d3dkmt_destroydevice dd;
	struct d3dkmt_createallocation ca;
	struct d3dkmt_createpagingqueue pq;
	struct d3dkmt_queryvideomemoryinfo q;
	struct d3dddi_allocationinfo2 infos[MEM_RESOURCE_ALLOCS];
	struct pydxg_alloc_desc descs[MEM_RESOURCE_ALLOCS];
	__u64 before = 0;
	int ret;

	ret = query_vidmem(fd, adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	if (ret == 0)
		before = q.current_usage;
	memset(&cd, 0, sizeof(cd));
	cd.adapter = adapter;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(r, LX_DXCREATEDEVICE, "left with memory", ret, 0, NULL);
	if (ret != 0)
		return;
	ret = create_allocations(fd, cd.device, (struct d3dkmthandle){ 0 }, 1, mem_resource_sizes,
				 MEM_RESOURCE_ALLOCS, infos, descs, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "a resource left to DestroyDevice", ret, 0, NULL);
	ret = create_allocations(fd, cd.device, (struct d3dkmthandle){ 0 }, 0, mem_resource_sizes,
				 2, infos, descs, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "allocations left to DestroyDevice", ret, 0, NULL);
	memset(&pq, 0, sizeof(pq));
	pq.device = cd.device;
	ret = dx(fd, LX_DXCREATEPAGINGQUEUE, &pq);
	EXPECT(r, LX_DXCREATEPAGINGQUEUE, "a queue left to DestroyDevice", ret, 0, NULL);
	memset(&dd, 0, sizeof(dd));
	dd.device = cd.device;
	ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
	EXPECT(r, LX_DXDESTROYDEVICE, "with its memory still there", ret, 0, NULL);
	ret = destroy_allocations(fd, cd.device, (struct d3dkmthandle){ 0 }, &infos[0].allocation,
				  1);
	EXPECT(r, LX_DXDESTROYALLOCATION2, "an allocation of the destroyed device", ret, -EBADF,
	       NULL);
	ret = query_vidmem(fd, adapter, _D3DKMT_MEMORY_SEGMENT_GROUP_LOCAL, &q);
	note(r, ret == 0 && q.current_usage == before, "LX_DXQUERYVIDEOMEMORYINFO",
	     "DestroyDevice gave the memory back", (int)q.current_usage, "the usage from before",
	     "usage %llu, %llu before", (unsigned long long)q.current_usage,
	     (unsigned long long)before);
}

/* Enumerate, run the memory test on the first adapter, close the adapters. */
static void memory_session(struct run *r, int fd)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	int n, i;

	memset(infos, 0, sizeof(infos));
	n = enum_adapters3(r, fd, infos);
	if (n < 0)
		return;
	memory(r, fd, infos[0].adapter_handle);
	memory_left_to_the_device(r, fd, infos[0].adapter_handle);
	for (i = 0; i < n; i++) {
		int rc = close_adapter(fd, infos[i].adapter_handle);

		EXPECT(r, LX_DXCLOSEADAPTER, "EnumAdapters3 handle", rc, 0, "handle 0x%x",
		       infos[i].adapter_handle.v);
	}
}

/* ---- synchronization objects ------------------------------------------------------------- */

struct synctest {
	struct run *r;
	int fd;
	struct d3dkmthandle device;
	struct d3dkmthandle context;
};

static int create_sync(int fd, struct d3dkmthandle device, unsigned int type, __u64 arg,
		       struct d3dkmt_createsynchronizationobject2 *c)
{
	memset(c, 0, sizeof(*c));
	c->device = device;
	c->info.type = type;
	switch (type) {
	case _D3DDDI_MONITORED_FENCE: c->info.monitored_fence.initial_fence_value = arg; break;
	case _D3DDDI_SEMAPHORE:
		c->info.semaphore.max_count = 4;
		c->info.semaphore.initial_count = (__u32)arg;
		break;
	case _D3DDDI_CPU_NOTIFICATION: c->info.cpu_notification.event = arg; break;
	default: c->info.fence.fence_value = arg; break;
	}
	return dx(fd, LX_DXCREATESYNCHRONIZATIONOBJECT, c);
}

static int destroy_sync(int fd, struct d3dkmthandle h)
{
	struct d3dkmt_destroysynchronizationobject d = { .sync_object = h };

	return dx(fd, LX_DXDESTROYSYNCHRONIZATIONOBJECT, &d);
}

static int signal_cpu(int fd, struct d3dkmthandle device, struct d3dkmthandle f, __u64 value)
{
	struct d3dkmt_signalsynchronizationobjectfromcpu s;

	memset(&s, 0, sizeof(s));
	s.device = device;
	s.object_count = 1;
	s.objects = (__u64 *)&f;
	s.fence_values = &value;
	return dx(fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU, &s);
}

/* WaitForSynchronizationObjectFromCpu on n fences; async_event 0 blocks. */
static int wait_cpu(int fd, struct d3dkmthandle device, struct d3dkmthandle *f, __u64 *values,
		    unsigned int n, int wait_any, int async_event)
{
	struct d3dkmt_waitforsynchronizationobjectfromcpu w;

	memset(&w, 0, sizeof(w));
	w.device = device;
	w.object_count = n;
	w.objects = (__u64 *)f;
	w.fence_values = values;
	w.async_event = (__u64)async_event;
	w.flags.wait_any = wait_any ? 1 : 0;
	return dx(fd, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, &w);
}

static int readable(int efd, int ms)
{
	struct timespec ts = { .tv_sec = 0, .tv_nsec = 1000000 };
	__u64 count = 0;
	int i;

	for (i = 0; i <= ms; i++) {
		if (read(efd, &count, sizeof(count)) == (ssize_t)sizeof(count))
			return (int)count;
		nanosleep(&ts, NULL);
	}
	return 0;
}

struct later_signal {
	int fd;
	struct d3dkmthandle device;
	struct d3dkmthandle fence;
	__u64 value;
	int ret;
};

static void *later_signal_main(void *arg)
{
	struct later_signal *l = arg;
	struct timespec ts = { .tv_sec = 0, .tv_nsec = 100 * 1000000 };

	nanosleep(&ts, NULL);
	l->ret = signal_cpu(l->fd, l->device, l->fence, l->value);
	return NULL;
}

/* Monitored fences from the CPU: create, signal, blocking and asynchronous waits. */
static void sync_cpu(struct synctest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createsynchronizationobject2 c;
	struct d3dkmthandle f, g, two[2];
	struct later_signal l;
	pthread_t th;
	__u64 values[2], v;
	int ret, efd;

	ret = create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 1, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a monitored fence", ret, 0, "fence 0x%x",
	       c.sync_object.v);
	if (ret != 0)
		return;
	f = c.sync_object;
	note(r, c.info.monitored_fence.fence_cpu_virtual_address == NULL,
	     "LX_DXCREATESYNCHRONIZATIONOBJECT",
	     "through the file the fence page is not mapped: address 0", 0, "0", NULL);
	ret = signal_cpu(t->fd, t->device, f, 5);
	EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU, "the fence to 5", ret, 0, NULL);
	v = 5;
	ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "blocking, a value reached already",
	       ret, 0, NULL);

	/* a value a second thread signals while this one is blocked */
	l.fd = t->fd;
	l.device = t->device;
	l.fence = f;
	l.value = 7;
	l.ret = -1;
	ret = pthread_create(&th, NULL, later_signal_main, &l);
	if (ret == 0) {
		v = 7;
		ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
		pthread_join(th, NULL);
		EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU,
		       "blocking until a second thread signals", ret, 0, NULL);
		EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU, "from the second thread", l.ret,
		       0, NULL);
	}

	/* asynchronous: an eventfd the node takes with pidfd_getfd */
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	v = 9;
	ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, efd);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "asynchronous, with an eventfd", ret, 0,
	       NULL);
	note(r, readable(efd, 50) == 0, "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
	     "the eventfd stays quiet before the value", 0, "not readable", NULL);
	ret = signal_cpu(t->fd, t->device, f, 9);
	note(r, ret == 0 && readable(efd, 5000) == 1, "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
	     "the eventfd is written once the fence gets there", ret, "readable", NULL);
	close(efd);

	/* wait-any and wait-all over two fences */
	ret = create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a second fence", ret, 0, NULL);
	g = c.sync_object;
	two[0] = f;
	two[1] = g;
	values[0] = 9;
	values[1] = 1;
	ret = wait_cpu(t->fd, t->device, two, values, 2, 1, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "wait-any, one reached", ret, 0, NULL);
	ret = signal_cpu(t->fd, t->device, g, 1);
	ret = ret ? ret : wait_cpu(t->fd, t->device, two, values, 2, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "wait-all, both reached", ret, 0, NULL);

	/* error paths */
	ret = wait_cpu(t->fd, t->device, two, values, 33, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "33 objects", ret, -EINVAL, NULL);
	two[1] = mem_bogus;
	ret = wait_cpu(t->fd, t->device, two, values, 2, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "bad handle", ret, -EBADF, NULL);
	ret = create_sync(t->fd, t->device, 6, 0, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a periodic fence (no display)", ret, -EPERM,
	       NULL);
	ret = create_sync(t->fd, t->device, 9, 0, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "type 9", ret, -EINVAL, NULL);

	ret = destroy_sync(t->fd, g);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "the second fence", ret, 0, NULL);
	ret = destroy_sync(t->fd, g);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "it again (stale handle)", ret, -EBADF, NULL);
	ret = destroy_sync(t->fd, f);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "the first fence", ret, 0, NULL);
}

/* A context's GPU timeline: signals and waits, the legacy calls, a CPU notification. */
static void sync_gpu(struct synctest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createsynchronizationobject2 c;
	struct d3dkmt_signalsynchronizationobjectfromgpu sg;
	struct d3dkmt_signalsynchronizationobjectfromgpu2 sg2;
	struct d3dkmt_waitforsynchronizationobjectfromgpu wg;
	struct d3dkmt_signalsynchronizationobject2 ls;
	struct d3dkmt_waitforsynchronizationobject2 lw;
	struct d3dkmthandle f, gate, sem, note_obj;
	__u64 ctxs[1], v, gv;
	int ret, efd;

	ret = create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	f = c.sync_object;
	ret = ret ? ret : create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	gate = c.sync_object;
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "two fences for the GPU", ret, 0, NULL);
	if (ret != 0)
		return;

	/* the context waits for the gate; a signal queued after it waits too */
	memset(&wg, 0, sizeof(wg));
	wg.context = t->context;
	wg.object_count = 1;
	wg.objects = (__u64 *)&gate;
	gv = 1;
	wg.monitored_fence_values = &gv;
	ret = dx(t->fd, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU, &wg);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMGPU, "the context waits for the gate", ret,
	       0, NULL);
	memset(&sg, 0, sizeof(sg));
	sg.context = t->context;
	sg.object_count = 1;
	sg.objects = (__u64 *)&f;
	v = 3;
	sg.monitored_fence_values = &v;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU, &sg);
	EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU, "the fence to 3 after it", ret, 0, NULL);
	ret = signal_cpu(t->fd, t->device, gate, 1);
	v = 3;
	ret = ret ? ret : wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "the GPU signal, once the gate opened",
	       ret, 0, NULL);

	/* SignalFromGpu2 with a CPU event: the eventfd is written when the context gets there */
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	memset(&sg2, 0, sizeof(sg2));
	ctxs[0] = t->context.v;
	sg2.context_count = 1;
	sg2.contexts = ctxs;
	sg2.flags.enqueue_cpu_event = 1;
	sg2.cpu_event_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2, &sg2);
	note(r, ret == 0 && readable(efd, 5000) == 1, "LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2",
	     "a CPU event enqueued on the context", ret, "0 and the eventfd written", NULL);
	close(efd);
	sg2.context_count = 65;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2, &sg2);
	EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU2, "65 contexts", ret, -EINVAL, NULL);

	/* the legacy calls on a semaphore and a CPU notification */
	ret = create_sync(t->fd, t->device, _D3DDDI_SEMAPHORE, 0, &c);
	sem = c.sync_object;
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a semaphore", ret, 0, NULL);
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	ret = create_sync(t->fd, t->device, _D3DDDI_CPU_NOTIFICATION, (__u64)efd, &c);
	note_obj = c.sync_object;
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a CPU notification with an eventfd", ret, 0,
	       NULL);
	memset(&ls, 0, sizeof(ls));
	ls.context = t->context;
	ls.object_count = 2;
	ls.object_array[0] = sem;
	ls.object_array[1] = note_obj;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECT, &ls);
	note(r, ret == 0 && readable(efd, 5000) == 1, "LX_DXSIGNALSYNCHRONIZATIONOBJECT",
	     "the semaphore and the CPU notification", ret, "0 and the eventfd written", NULL);
	memset(&lw, 0, sizeof(lw));
	lw.context = t->context;
	lw.object_count = 1;
	lw.object_array[0] = sem;
	ret = dx(t->fd, LX_DXWAITFORSYNCHRONIZATIONOBJECT, &lw);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECT, "the semaphore (taken)", ret, 0, NULL);
	v = 4;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU, &sg);
	ret = ret ? ret : wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "past the semaphore", ret, 0, NULL);
	ls.object_count = 33;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECT, &ls);
	EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECT, "33 objects", ret, -EINVAL, NULL);
	lw.object_count = 0;
	ret = dx(t->fd, LX_DXWAITFORSYNCHRONIZATIONOBJECT, &lw);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECT, "no objects", ret, -EINVAL, NULL);
	close(efd);
	destroy_sync(t->fd, note_obj);
	destroy_sync(t->fd, sem);
	destroy_sync(t->fd, gate);
	ret = destroy_sync(t->fd, f);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "the GPU test's objects", ret, 0, NULL);
}

/* The sync test on one adapter: a device and a context, their objects, everything gone. */
/*
 * Sharing through the file (docs/sharing.md): a file cannot put a new descriptor into its
 * caller, so ShareObjects and CreateSyncFile answer -EOPNOTSUPP (and leave nothing behind);
 * ShareObjectWithHost answers -EPERM (STATUS_NOT_SUPPORTED: pydxg's host is no Windows host);
 * a descriptor that is not a share descriptor or a sync file is -EINVAL, one not open -EBADF.
 */
static void share_paths(struct synctest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createsynchronizationobject2 c;
	struct d3dkmt_shareobjects so;
	struct d3dkmt_shareobjectwithhost swh;
	struct d3dkmt_createsyncfile csf;
	struct d3dkmt_waitsyncfile wsf;
	struct d3dkmt_opensyncobjectfromsyncfile osf;
	struct d3dkmt_opensyncobjectfromnthandle2 ont;
	struct d3dkmt_queryresourceinfofromnthandle qri;
	struct d3dkmt_openresourcefromnthandle ori;
	struct d3dddi_allocationinfo2 info;
	struct pydxg_alloc_desc desc;
	struct d3dkmt_createallocation ca;
	struct d3dkmt_destroyallocation2 da;
	__u32 object;
	__u64 shared = 0, size = 4096;
	int efd, ret;

	memset(&c, 0, sizeof(c));
	c.device = t->device;
	c.info.type = _D3DDDI_MONITORED_FENCE;
	c.info.flags.shared = 1;
	c.info.flags.nt_security_sharing = 1;
	ret = dx(t->fd, LX_DXCREATESYNCHRONIZATIONOBJECT, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a shared monitored fence", ret, 0, NULL);
	if (ret != 0)
		return;
	object = c.sync_object.v;
	memset(&so, 0, sizeof(so));
	so.object_count = 1;
	so.objects = (void *)&object;
	so.desired_access = 0x10000000; /* GENERIC_ALL */
	so.shared_handle = &shared;
	ret = dx(t->fd, LX_DXSHAREOBJECTS, &so);
	EXPECT(r, LX_DXSHAREOBJECTS, "through the file (cannot hand a descriptor)", ret,
	       -EOPNOTSUPP, NULL);
	memset(&csf, 0, sizeof(csf));
	csf.device = t->device;
	csf.monitored_fence = c.sync_object;
	csf.fence_value = 1;
	ret = dx(t->fd, LX_DXCREATESYNCFILE, &csf);
	EXPECT(r, LX_DXCREATESYNCFILE, "through the file (cannot hand a descriptor)", ret,
	       -EOPNOTSUPP, NULL);
	memset(&swh, 0, sizeof(swh));
	swh.device_handle = t->device;
	swh.object_handle = c.sync_object;
	ret = dx(t->fd, LX_DXSHAREOBJECTWITHHOST, &swh);
	EXPECT(r, LX_DXSHAREOBJECTWITHHOST, "no Windows host", ret, -EPERM, NULL);

	efd = eventfd(0, EFD_CLOEXEC);
	memset(&qri, 0, sizeof(qri));
	qri.device = t->device;
	qri.nt_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXQUERYRESOURCEINFOFROMNTHANDLE, &qri);
	EXPECT(r, LX_DXQUERYRESOURCEINFOFROMNTHANDLE, "an eventfd", ret, -EINVAL, NULL);
	memset(&ori, 0, sizeof(ori));
	ori.device = t->device;
	ori.nt_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXOPENRESOURCEFROMNTHANDLE, &ori);
	EXPECT(r, LX_DXOPENRESOURCEFROMNTHANDLE, "an eventfd", ret, -EINVAL, NULL);
	memset(&ont, 0, sizeof(ont));
	ont.device = t->device;
	ont.nt_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXOPENSYNCOBJECTFROMNTHANDLE2, &ont);
	EXPECT(r, LX_DXOPENSYNCOBJECTFROMNTHANDLE2, "an eventfd", ret, -EINVAL, NULL);
	ont.nt_handle = 1000000; /* not open */
	ret = dx(t->fd, LX_DXOPENSYNCOBJECTFROMNTHANDLE2, &ont);
	EXPECT(r, LX_DXOPENSYNCOBJECTFROMNTHANDLE2, "a descriptor not open", ret, -EBADF, NULL);
	memset(&wsf, 0, sizeof(wsf));
	wsf.context = t->context;
	wsf.sync_file_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXWAITSYNCFILE, &wsf);
	EXPECT(r, LX_DXWAITSYNCFILE, "an eventfd", ret, -EINVAL, NULL);
	memset(&osf, 0, sizeof(osf));
	osf.device = t->device;
	osf.sync_file_handle = (__u64)efd;
	ret = dx(t->fd, LX_DXOPENSYNCOBJECTFROMSYNCFILE, &osf);
	EXPECT(r, LX_DXOPENSYNCOBJECTFROMSYNCFILE, "an eventfd", ret, -EINVAL, NULL);
	if (efd >= 0)
		close(efd);

	/* a shared resource: made through the file, not shareable from it */
	memset(&info, 0, sizeof(info));
	alloc_desc(&desc, size);
	info.priv_drv_data = (void *)&desc;
	info.priv_drv_data_size = sizeof(desc);
	memset(&ca, 0, sizeof(ca));
	ca.device = t->device;
	ca.alloc_count = 1;
	ca.allocation_info = (void *)&info;
	ca.flags.create_resource = 1;
	ca.flags.create_shared = 1;
	ca.flags.nt_security_sharing = 1;
	ret = dx(t->fd, LX_DXCREATEALLOCATION, &ca);
	EXPECT(r, LX_DXCREATEALLOCATION, "a shared resource", ret, 0, NULL);
	if (ret == 0) {
		object = ca.resource.v;
		ret = dx(t->fd, LX_DXSHAREOBJECTS, &so);
		EXPECT(r, LX_DXSHAREOBJECTS, "a resource, through the file", ret, -EOPNOTSUPP,
		       NULL);
		memset(&da, 0, sizeof(da));
		da.device = t->device;
		da.resource = ca.resource;
		ret = dx(t->fd, LX_DXDESTROYALLOCATION2, &da);
		EXPECT(r, LX_DXDESTROYALLOCATION2, "the shared resource", ret, 0, NULL);
	}
	ret = destroy_sync(t->fd, c.sync_object);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "the shared fence", ret, 0, NULL);
}

static void sync_objects(struct run *r, int fd, struct d3dkmthandle adapter)
{
	struct synctest t;
	struct d3dkmt_createdevice cd;
	struct d3dkmt_createcontextvirtual cc;
	struct d3dkmt_destroydevice dd;
	struct d3dkmt_createsynchronizationobject2 c;
	int ret;

	memset(&t, 0, sizeof(t));
	t.r = r;
	t.fd = fd;
	memset(&cd, 0, sizeof(cd));
	cd.adapter = adapter;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(r, LX_DXCREATEDEVICE, "for sync objects", ret, 0, NULL);
	if (ret != 0)
		return;
	t.device = cd.device;
	memset(&cc, 0, sizeof(cc));
	cc.device = cd.device;
	ret = dx(fd, LX_DXCREATECONTEXTVIRTUAL, &cc);
	EXPECT(r, LX_DXCREATECONTEXTVIRTUAL, "for GPU signals and waits", ret, 0, NULL);
	t.context = cc.context;
	sync_cpu(&t);
	if (ret == 0)
		sync_gpu(&t);
	if (ret == 0)
		share_paths(&t);
	ret = create_sync(fd, t.device, _D3DDDI_MONITORED_FENCE, 0, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a fence left to DestroyDevice", ret, 0, NULL);
	memset(&dd, 0, sizeof(dd));
	dd.device = t.device;
	ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
	EXPECT(r, LX_DXDESTROYDEVICE, "with a fence still there", ret, 0, NULL);
	ret = signal_cpu(fd, t.device, c.sync_object, 1);
	EXPECT_BAD_HANDLE(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMCPU, "on the destroyed device",
			  ret);
}

/* Enumerate, run the sync test on the first adapter, close the adapters. */
static void sync_session(struct run *r, int fd)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	int n, i;

	memset(infos, 0, sizeof(infos));
	n = enum_adapters3(r, fd, infos);
	if (n < 0)
		return;
	sync_objects(r, fd, infos[0].adapter_handle);
	for (i = 0; i < n; i++) {
		int rc = close_adapter(fd, infos[i].adapter_handle);

		EXPECT(r, LX_DXCLOSEADAPTER, "EnumAdapters3 handle", rc, 0, "handle 0x%x",
		       infos[i].adapter_handle.v);
	}
}

/* ---- hardware queues, execution, statistics ------------------------------------------------ */

/*
 * Through the file a program cannot map an allocation (Lock2 fails with EOPNOTSUPP) nor read
 * one back, so on its own it cannot put a command buffer in device memory. With -p a "memory
 * peer" stands in for Lock2 + memcpy: the program asks on stdout ("@write VA HEX", "@read VA
 * N") and the peer, which can reach the device memory (the test harness, through the host),
 * answers on stdin ("ok", or the bytes as hex). The program still builds every command buffer
 * itself, in the documented pydxg-soft-v1 format (docs/commands.md). Without a peer the queue
 * test runs everything that needs no bytes in memory: queues, priorities, fences on queues, a
 * command buffer at an unmapped VA that faults its device, MarkDeviceAsError, statistics.
 */
#define Q_VA_SIZE (1ull << 20)
#define Q_SLOT (64ull << 10)            /* each allocation 64 KiB apart in the reserved range */
#define Q_N 1024u                       /* f32 elements of each data buffer */
#define Q_DATA_SIZE (Q_N * 4u)
#define Q_CMD_SIZE 4096u
#define Q_UNMAPPED_VA 0x7f0000000ull    /* nothing is ever mapped there */
#define SOFT_MAGIC 0x43584450u          /* "PDXC" */
#define SOFT_FILL 4
#define SOFT_BINARY 6
#define SOFT_BINARY_ADD 1
#define SOFT_BINARY_MUL 3
#define SOFT_F32 2
#define STATS_MAGIC 0x51584450u         /* "PDXQ": pydxg's statistics record, docs/statistics.md */

/* pydxg's QueryStatistics result (docs/statistics.md), version 2. */
struct pydxg_stats {
	__u32 magic;
	__u16 version;
	__u16 size;
	__u32 type;
	__u32 reserved;
	__u64 processes, devices, contexts, hwqueues, allocations;
	__u64 committed_local, committed_nonlocal, local_capacity, nonlocal_capacity;
	__u64 command_buffers, commands, engine_busy_ns, faults, resets;
	__u64 demoted_bytes, promoted_bytes;
	__u64 reserved2;
};
_Static_assert(sizeof(struct pydxg_stats) == 152, "the statistics record is 152 bytes");

struct queuetest {
	struct run *r;
	int fd;
	int peer;                                   /* -p: a memory peer answers on stdin */
	struct d3dkmthandle adapter, device, context, queue, progress;
	struct d3dkmthandle paging, paging_fence;
	struct d3dkmthandle cmd, a, b, c;           /* allocations: a command buffer, three data */
	__u64 va, cmd_va, a_va, b_va, c_va;
};

static int peer_write(struct queuetest *t, __u64 va, const void *data, size_t n)
{
	const unsigned char *p = data;
	char line[64];
	size_t i;

	if (!t->peer)
		return -1;
	printf("@write %llx ", (unsigned long long)va);
	for (i = 0; i < n; i++)
		printf("%02x", p[i]);
	printf("\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return -1;
	return strncmp(line, "ok", 2) ? -1 : 0;
}

static int peer_read(struct queuetest *t, __u64 va, void *data, size_t n)
{
	unsigned char *p = data;
	char *line;
	size_t i;
	int ret = 0;

	if (!t->peer)
		return -1;
	line = malloc(2 * n + 16);
	if (!line)
		return -1;
	printf("@read %llx %zu\n", (unsigned long long)va, n);
	fflush(stdout);
	if (!fgets(line, (int)(2 * n + 16), stdin) || strlen(line) < 2 * n)
		ret = -1;
	for (i = 0; ret == 0 && i < n; i++) {
		unsigned int byte;

		if (sscanf(line + 2 * i, "%2x", &byte) != 1)
			ret = -1;
		p[i] = (unsigned char)byte;
	}
	free(line);
	return ret;
}

/* pydxg-soft-v1 encoders (docs/commands.md): little-endian, no padding. */
static void put16(unsigned char *p, __u16 v) { memcpy(p, &v, 2); }
static void put32(unsigned char *p, __u32 v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, __u64 v) { memcpy(p, &v, 8); }

static size_t soft_header(unsigned char *p, __u32 count, __u32 total)
{
	memset(p, 0, 16);
	put32(p, SOFT_MAGIC);
	put16(p + 4, 1);
	put32(p + 8, count);
	put32(p + 12, total);
	return 16;
}

/* A 1-D contiguous f32 operand of n elements (48 bytes). */
static void soft_operand(unsigned char *p, __u64 va, __u32 n)
{
	memset(p, 0, 48);
	put64(p, va);
	p[8] = SOFT_F32;
	p[9] = 1;
	put32(p + 16, n);
}

static size_t soft_fill(unsigned char *p, __u64 va, __u32 n, float value)
{
	__u32 bits;

	memset(p, 0, 64);
	memcpy(&bits, &value, 4);
	put16(p, SOFT_FILL);
	put16(p + 2, 64);
	put64(p + 8, bits);
	soft_operand(p + 16, va, n);
	return 64;
}

static size_t soft_binary(unsigned char *p, __u16 fn, __u64 dst, __u64 a, __u64 b, __u32 n)
{
	memset(p, 0, 152);
	put16(p, SOFT_BINARY);
	put16(p + 2, 152);
	put16(p + 4, fn);
	soft_operand(p + 8, dst, n);
	soft_operand(p + 56, a, n);
	soft_operand(p + 104, b, n);
	return 152;
}

static int get_state(int fd, struct d3dkmthandle device, unsigned int type,
		     struct d3dkmt_getdevicestate *gs)
{
	memset(gs, 0, sizeof(*gs));
	gs->device = device;
	gs->state_type = type;
	return dx(fd, LX_DXGETDEVICESTATE, gs);
}

static int create_hwqueue(int fd, struct d3dkmthandle context, struct d3dkmt_createhwqueue *q)
{
	memset(q, 0, sizeof(*q));
	q->context = context;
	return dx(fd, LX_DXCREATEHWQUEUE, q);
}

static int destroy_hwqueue(int fd, struct d3dkmthandle queue)
{
	struct d3dkmt_destroyhwqueue d = { .queue = queue };

	return dx(fd, LX_DXDESTROYHWQUEUE, &d);
}

static int submit_hwqueue(int fd, struct d3dkmthandle queue, __u64 va, __u32 length, __u64 id)
{
	struct d3dkmt_submitcommandtohwqueue s;

	memset(&s, 0, sizeof(s));
	s.hwqueue = queue;
	s.hwqueue_progress_fence_id = id;
	s.command_buffer = va;
	s.command_length = length;
	return dx(fd, LX_DXSUBMITCOMMANDTOHWQUEUE, &s);
}

static int submit_command(int fd, struct d3dkmthandle context, __u64 va, __u32 length)
{
	struct d3dkmt_submitcommand s;

	memset(&s, 0, sizeof(s));
	s.command_buffer = va;
	s.command_length = length;
	s.broadcast_context_count = 1;
	s.broadcast_context[0] = context;
	return dx(fd, LX_DXSUBMITCOMMAND, &s);
}

static int query_stats(int fd, struct winluid luid, unsigned int type, __u64 pid,
		       struct pydxg_stats *out)
{
	struct d3dkmt_querystatistics q;
	int ret;

	memset(&q, 0, sizeof(q));
	q.type = type;
	q.adapter_luid = luid;
	q.process = pid;
	ret = dx(fd, LX_DXQUERYSTATISTICS, &q);
	memcpy(out, &q.result, sizeof(*out));
	return ret;
}

static int invalidate(int fd, struct d3dkmthandle device, struct d3dkmthandle alloc,
		      __u64 offset, __u64 length)
{
	struct d3dkmt_invalidatecache c;

	memset(&c, 0, sizeof(c));
	c.device = device;
	c.allocation = alloc;
	c.offset = offset;
	c.length = length;
	return dx(fd, LX_DXINVALIDATECACHE, &c);
}

/* A device and a context on it. */
static int q_device(struct queuetest *t, const char *what, struct d3dkmthandle *device,
		    struct d3dkmthandle *context)
{
	struct d3dkmt_createdevice cd;
	struct d3dkmt_createcontextvirtual cv;
	int ret;

	memset(&cd, 0, sizeof(cd));
	cd.adapter = t->adapter;
	ret = dx(t->fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(t->r, LX_DXCREATEDEVICE, what, ret, 0, "device 0x%x", cd.device.v);
	if (ret != 0)
		return ret;
	*device = cd.device;
	memset(&cv, 0, sizeof(cv));
	cv.device = cd.device;
	ret = dx(t->fd, LX_DXCREATECONTEXTVIRTUAL, &cv);
	EXPECT(t->r, LX_DXCREATECONTEXTVIRTUAL, what, ret, 0, "context 0x%x", cv.context.v);
	*context = cv.context;
	return ret;
}

/* 1. A hardware queue: two non-zero handles, no fence page through the file. */
static int q_create(struct queuetest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createhwqueue q;
	int ret;

	ret = create_hwqueue(t->fd, t->context, &q);
	EXPECT(r, LX_DXCREATEHWQUEUE, "on the context", ret, 0,
	       "queue 0x%x progress fence 0x%x fence at %p", q.queue.v, q.queue_progress_fence.v,
	       (void *)q.queue_progress_fence_cpu_va);
	note(r, ret == 0 && q.queue.v != 0 && q.queue_progress_fence.v != 0 &&
		     q.queue.v != q.queue_progress_fence.v, "LX_DXCREATEHWQUEUE",
	     "queue and progress fence handles", ret, "two distinct non-zero handles", NULL);
	note(r, q.queue_progress_fence_cpu_va == NULL, "LX_DXCREATEHWQUEUE",
	     "no fence mapping through the file", 0, "queue_progress_fence_cpu_va 0", NULL);
	t->queue = q.queue;
	t->progress = q.queue_progress_fence;
	ret = create_hwqueue(t->fd, mem_bogus, &q);
	EXPECT(r, LX_DXCREATEHWQUEUE, "bad context handle", ret, -EBADF, NULL);
	return t->queue.v ? 0 : -1;
}

/* 2. Scheduling priorities, global and in-process: set, read back, -7..7 only. */
static void q_priorities(struct queuetest *t)
{
	struct run *r = t->r;
	struct d3dkmt_setcontextschedulingpriority sp;
	struct d3dkmt_getcontextschedulingpriority gp;
	struct d3dkmt_setcontextinprocessschedulingpriority sip;
	struct d3dkmt_getcontextinprocessschedulingpriority gip;
	int ret, bad[2] = { 8, -8 }, i;

	sp.context = t->context;
	sp.priority = 3;
	ret = dx(t->fd, LX_DXSETCONTEXTSCHEDULINGPRIORITY, &sp);
	EXPECT(r, LX_DXSETCONTEXTSCHEDULINGPRIORITY, "3", ret, 0, NULL);
	sip.context = t->context;
	sip.priority = -2;
	ret = dx(t->fd, LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY, &sip);
	EXPECT(r, LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY, "-2", ret, 0, NULL);
	gp.context = t->context;
	gp.priority = 99;
	ret = dx(t->fd, LX_DXGETCONTEXTSCHEDULINGPRIORITY, &gp);
	EXPECT(r, LX_DXGETCONTEXTSCHEDULINGPRIORITY, "the context", ret, 0, "%d", gp.priority);
	note(r, ret == 0 && gp.priority == 3, "LX_DXGETCONTEXTSCHEDULINGPRIORITY",
	     "the priority set", ret, "3", "%d", gp.priority);
	gip.context = t->context;
	gip.priority = 99;
	ret = dx(t->fd, LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY, &gip);
	EXPECT(r, LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY, "the context", ret, 0, "%d",
	       gip.priority);
	note(r, ret == 0 && gip.priority == -2, "LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY",
	     "the in-process priority set", ret, "-2", "%d", gip.priority);
	for (i = 0; i < 2; i++) {
		char what[32];

		snprintf(what, sizeof(what), "%d (out of -7..7)", bad[i]);
		sp.priority = bad[i];
		ret = dx(t->fd, LX_DXSETCONTEXTSCHEDULINGPRIORITY, &sp);
		EXPECT(r, LX_DXSETCONTEXTSCHEDULINGPRIORITY, what, ret, -EINVAL, NULL);
		sip.priority = bad[i];
		ret = dx(t->fd, LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY, &sip);
		EXPECT(r, LX_DXSETCONTEXTINPROCESSSCHEDULINGPRIORITY, what, ret, -EINVAL, NULL);
	}
	ret = dx(t->fd, LX_DXGETCONTEXTSCHEDULINGPRIORITY, &gp);
	note(r, ret == 0 && gp.priority == 3, "LX_DXGETCONTEXTSCHEDULINGPRIORITY",
	     "unchanged by the refused ones", ret, "3", "%d", gp.priority);
	sp.context = mem_bogus;
	sp.priority = 0;
	ret = dx(t->fd, LX_DXSETCONTEXTSCHEDULINGPRIORITY, &sp);
	EXPECT(r, LX_DXSETCONTEXTSCHEDULINGPRIORITY, "bad context handle", ret, -EBADF, NULL);
	gip.context = mem_bogus;
	ret = dx(t->fd, LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY, &gip);
	EXPECT(r, LX_DXGETCONTEXTINPROCESSSCHEDULINGPRIORITY, "bad context handle", ret, -EBADF,
	       NULL);
}

/* Map one allocation at `va` (writable); waits for the paging fence when the map is queued. */
static int q_map(struct queuetest *t, struct d3dkmthandle alloc, __u64 va, __u64 size)
{
	struct d3dddi_mapgpuvirtualaddress mg;
	int ret;

	memset(&mg, 0, sizeof(mg));
	mg.paging_queue = t->paging;
	mg.base_address = va;
	mg.allocation = alloc;
	mg.size_in_pages = size / PYDXG_PAGE;
	mg.protection.write = 1;
	ret = dx(t->fd, LX_DXMAPGPUVIRTUALADDRESS, &mg);
	EXPECT2(t->r, LX_DXMAPGPUVIRTUALADDRESS, "for the queue", ret, 0, NT_STATUS_PENDING,
		"va 0x%llx", (unsigned long long)mg.virtual_address);
	if (ret == NT_STATUS_PENDING) {
		__u64 v = mg.paging_fence_value;

		ret = wait_cpu(t->fd, t->device, &t->paging_fence, &v, 1, 0, 0);
		EXPECT(t->r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "the paging fence", ret, 0,
		       NULL);
	}
	return ret == 0 && mg.virtual_address == va ? 0 : -1;
}

/* 3. Memory: a command buffer and three data buffers, mapped 64 KiB apart in one range. */
static int q_memory(struct queuetest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createpagingqueue pq;
	struct d3dddi_allocationinfo2 info;
	struct pydxg_alloc_desc desc;
	struct d3dkmt_createallocation ca;
	struct d3dkmthandle *allocs[4] = { &t->cmd, &t->a, &t->b, &t->c };
	__u64 sizes[4] = { Q_CMD_SIZE, Q_DATA_SIZE, Q_DATA_SIZE, Q_DATA_SIZE };
	int ret, i;

	memset(&pq, 0, sizeof(pq));
	pq.device = t->device;
	ret = dx(t->fd, LX_DXCREATEPAGINGQUEUE, &pq);
	EXPECT(r, LX_DXCREATEPAGINGQUEUE, "for the queue's memory", ret, 0, NULL);
	if (ret != 0)
		return -1;
	t->paging = pq.paging_queue;
	t->paging_fence = pq.sync_object;
	for (i = 0; i < 4; i++) {
		ret = create_allocations(t->fd, t->device, (struct d3dkmthandle){ 0 }, 0, &sizes[i],
					 1, &info, &desc, &ca);
		EXPECT(r, LX_DXCREATEALLOCATION, i ? "a data buffer" : "a command buffer", ret, 0,
		       "allocation 0x%x", info.allocation.v);
		if (ret != 0)
			return -1;
		*allocs[i] = info.allocation;
	}
	ret = reserve_va(t->fd, t->adapter, 0, Q_VA_SIZE, &t->va);
	EXPECT2(r, LX_DXRESERVEGPUVIRTUALADDRESS, "for the queue", ret, 0, NT_STATUS_PENDING,
		"va 0x%llx", (unsigned long long)t->va);
	if (ret < 0 || t->va == 0)
		return -1;
	t->cmd_va = t->va;
	t->a_va = t->va + Q_SLOT;
	t->b_va = t->va + 2 * Q_SLOT;
	t->c_va = t->va + 3 * Q_SLOT;
	if (q_map(t, t->cmd, t->cmd_va, Q_CMD_SIZE) || q_map(t, t->a, t->a_va, Q_DATA_SIZE) ||
	    q_map(t, t->b, t->b_va, Q_DATA_SIZE) || q_map(t, t->c, t->c_va, Q_DATA_SIZE))
		return -1;
	return 0;
}

/* Whether all n f32 at `va` are `want` (read through the peer). */
static int q_values(struct queuetest *t, __u64 va, float want, float *got)
{
	static float buf[Q_N];
	unsigned int i;

	if (peer_read(t, va, buf, sizeof(buf)))
		return 0;
	for (i = 0; i < Q_N; i++) {
		if (buf[i] != want) {
			*got = buf[i];
			return 0;
		}
	}
	*got = want;
	return 1;
}

/*
 * 4. Command buffers (with a memory peer): the first FILLs a and b, the second adds them into
 * c, both on the queue (progress values 1 and 2); a third multiplies c by b, by SubmitCommand
 * on the context, followed by a GPU signal of a fence on the context.
 */
static void q_execute(struct queuetest *t)
{
	struct run *r = t->r;
	unsigned char fill[16 + 2 * 64], add[16 + 152], mul[16 + 152];
	struct d3dkmt_createsynchronizationobject2 c;
	struct d3dkmt_signalsynchronizationobjectfromgpu sg;
	struct d3dkmt_getdevicestate gs;
	struct d3dkmthandle f;
	__u64 v;
	float got = 0;
	size_t n;
	int ret, ok;

	n = soft_header(fill, 2, sizeof(fill));
	n += soft_fill(fill + n, t->a_va, Q_N, 1.5f);
	soft_fill(fill + n, t->b_va, Q_N, 2.0f);
	n = soft_header(add, 1, sizeof(add));
	soft_binary(add + n, SOFT_BINARY_ADD, t->c_va, t->a_va, t->b_va, Q_N);
	n = soft_header(mul, 1, sizeof(mul));
	soft_binary(mul + n, SOFT_BINARY_MUL, t->c_va, t->c_va, t->b_va, Q_N);
	ret = peer_write(t, t->cmd_va, fill, sizeof(fill));
	ret = ret ? ret : peer_write(t, t->cmd_va + 512, add, sizeof(add));
	ret = ret ? ret : peer_write(t, t->cmd_va + 1024, mul, sizeof(mul));
	note(r, ret == 0, "peer", "three command buffers in the allocation", ret, "0", NULL);
	if (ret)
		return;

	ret = submit_hwqueue(t->fd, t->queue, t->cmd_va, sizeof(fill), 1);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "FILL a and b (progress 1)", ret, 0, NULL);
	ret = submit_hwqueue(t->fd, t->queue, t->cmd_va + 512, sizeof(add), 2);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "c = a + b (progress 2)", ret, 0, NULL);
	v = 2;
	ret = wait_cpu(t->fd, t->device, &t->progress, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "the queue's progress fence at 2", ret,
	       0, NULL);
	ret = get_state(t->fd, t->device, _D3DKMT_DEVICESTATE_EXECUTION, &gs);
	note(r, ret == 0 && gs.execution_state == _D3DKMT_DEVICEEXECUTION_ACTIVE,
	     "LX_DXGETDEVICESTATE", "still active after the work", ret, "ACTIVE", "state %d",
	     (int)gs.execution_state);
	ok = q_values(t, t->c_va, 3.5f, &got);
	note(r, ok, "peer", "c = 1.5 + 2 everywhere", 0, "3.5", "got %g", (double)got);

	ret = create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "a fence after SubmitCommand", ret, 0, NULL);
	f = c.sync_object;
	ret = submit_command(t->fd, t->context, t->cmd_va + 1024, sizeof(mul));
	EXPECT(r, LX_DXSUBMITCOMMAND, "c = c * b on the context", ret, 0, NULL);
	memset(&sg, 0, sizeof(sg));
	sg.context = t->context;
	sg.object_count = 1;
	sg.objects = (__u64 *)&f;
	v = 1;
	sg.monitored_fence_values = &v;
	ret = dx(t->fd, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU, &sg);
	EXPECT(r, LX_DXSIGNALSYNCHRONIZATIONOBJECTFROMGPU, "after the buffer", ret, 0, NULL);
	v = 1;
	ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "SubmitCommand's buffer done", ret, 0,
	       NULL);
	ok = q_values(t, t->c_va, 7.0f, &got);
	note(r, ok, "peer", "c = 3.5 * 2 everywhere", 0, "7", "got %g", (double)got);
	destroy_sync(t->fd, f);
}

/* 5. Fences on the queue: a signal after its work, a wait that holds its later work. */
static void q_fences(struct queuetest *t)
{
	struct run *r = t->r;
	struct d3dkmt_createsynchronizationobject2 c;
	struct d3dkmt_submitsignalsyncobjectstohwqueue ss;
	struct d3dkmt_submitwaitforsyncobjectstohwqueue sw;
	struct d3dkmthandle f, gate;
	__u64 v, gv, queues[1];
	int ret, efd;

	ret = create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	f = c.sync_object;
	ret = ret ? ret : create_sync(t->fd, t->device, _D3DDDI_MONITORED_FENCE, 0, &c);
	gate = c.sync_object;
	EXPECT(r, LX_DXCREATESYNCHRONIZATIONOBJECT, "two fences for the queue", ret, 0, NULL);
	if (ret != 0)
		return;

	queues[0] = t->queue.v;
	memset(&ss, 0, sizeof(ss));
	ss.hwqueue_count = 1;
	ss.hwqueues = queues;
	ss.object_count = 1;
	ss.objects = (__u64 *)&f;
	v = 1;
	ss.fence_values = &v;
	ret = dx(t->fd, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, &ss);
	EXPECT(r, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, "a fence to 1", ret, 0, NULL);
	v = 1;
	ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "the queue's signal", ret, 0, NULL);

	memset(&sw, 0, sizeof(sw));
	sw.hwqueue = t->queue;
	sw.object_count = 1;
	sw.objects = (__u64 *)&gate;
	gv = 1;
	sw.fence_values = &gv;
	ret = dx(t->fd, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, &sw);
	EXPECT(r, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, "the queue waits for the gate", ret, 0,
	       NULL);
	v = 2;
	ret = dx(t->fd, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, &ss);
	EXPECT(r, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, "the fence to 2 behind the wait", ret, 0,
	       NULL);
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	v = 2;
	ret = wait_cpu(t->fd, t->device, &f, &v, 1, 0, efd);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "asynchronous, for 2", ret, 0, NULL);
	note(r, readable(efd, 50) == 0, "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE",
	     "the queue holds the signal while the gate is shut", 0, "not readable", NULL);
	ret = signal_cpu(t->fd, t->device, gate, 1);
	note(r, ret == 0 && readable(efd, 5000) == 1, "LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE",
	     "the signal comes once the gate opens", ret, "readable", NULL);
	close(efd);
	v = t->peer ? 2 : 0;
	ret = wait_cpu(t->fd, t->device, &t->progress, &v, 1, 0, 0);
	EXPECT(r, LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU, "the progress fence handle", ret, 0,
	       NULL);

	/* error paths */
	ss.hwqueue_count = 0;
	ret = dx(t->fd, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, &ss);
	EXPECT(r, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, "no queues", ret, -EINVAL, NULL);
	ss.hwqueue_count = 1;
	ss.object_count = D3DDDI_MAX_OBJECT_SIGNALED + 1;
	ret = dx(t->fd, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, &ss);
	EXPECT(r, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, "33 objects", ret, -EINVAL, NULL);
	ss.object_count = 1;
	queues[0] = mem_bogus.v;
	ret = dx(t->fd, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, &ss);
	EXPECT(r, LX_DXSUBMITSIGNALSYNCOBJECTSTOHWQUEUE, "bad queue handle", ret, -EBADF, NULL);
	sw.object_count = 0;
	ret = dx(t->fd, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, &sw);
	EXPECT(r, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, "no objects", ret, -EINVAL, NULL);
	sw.object_count = 1;
	sw.hwqueue = mem_bogus;
	ret = dx(t->fd, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, &sw);
	EXPECT(r, LX_DXSUBMITWAITFORSYNCOBJECTSTOHWQUEUE, "bad queue handle", ret, -EBADF, NULL);
	ret = submit_hwqueue(t->fd, t->queue, t->cmd_va, 0, 9);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "command_length 0", ret, -EINVAL, NULL);
	ret = submit_hwqueue(t->fd, mem_bogus, t->cmd_va, 64, 9);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "bad queue handle", ret, -EBADF, NULL);
	ret = submit_command(t->fd, mem_bogus, t->cmd_va, 64);
	EXPECT(r, LX_DXSUBMITCOMMAND, "bad context handle", ret, -EBADF, NULL);
	destroy_sync(t->fd, gate);
	ret = destroy_sync(t->fd, f);
	EXPECT(r, LX_DXDESTROYSYNCHRONIZATIONOBJECT, "the queue's fences", ret, 0, NULL);
}

/*
 * 6. A command buffer at an unmapped VA on a second device: that device faults (a page fault
 * at that address), its queue's waits fail and its later work is refused; the first device
 * stays active. A third device is marked as in error: RESET.
 */
static void q_faults(struct queuetest *t)
{
	struct run *r = t->r;
	struct d3dkmthandle dev2, ctx2, dev3, ctx3;
	struct d3dkmt_createhwqueue q2;
	struct d3dkmt_getdevicestate gs;
	struct d3dkmt_markdeviceaserror me;
	struct d3dkmt_destroydevice dd;
	__u64 v;
	int ret, i;

	if (q_device(t, "a second device, to fault", &dev2, &ctx2))
		return;
	ret = create_hwqueue(t->fd, ctx2, &q2);
	EXPECT(r, LX_DXCREATEHWQUEUE, "on the second device", ret, 0, NULL);
	ret = submit_hwqueue(t->fd, q2.queue, Q_UNMAPPED_VA, 64, 1);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "a command buffer at an unmapped VA", ret, 0,
	       "fire-and-forget: the fault shows in the device's state");
	for (i = 0; i < 1000; i++) {
		struct timespec ts = { .tv_sec = 0, .tv_nsec = 10 * 1000000 };

		ret = get_state(t->fd, dev2, _D3DKMT_DEVICESTATE_EXECUTION, &gs);
		if (ret != 0 || gs.execution_state != _D3DKMT_DEVICEEXECUTION_ACTIVE)
			break;
		nanosleep(&ts, NULL);
	}
	note(r, ret == 0 && gs.execution_state == _D3DKMT_DEVICEEXECUTION_ERROR_DMAPAGEFAULT,
	     "LX_DXGETDEVICESTATE", "the faulting device's execution state", ret,
	     "ERROR_DMAPAGEFAULT (not ACTIVE)", "state %d", (int)gs.execution_state);
	ret = get_state(t->fd, dev2, _D3DKMT_DEVICESTATE_PAGE_FAULT, &gs);
	note(r, ret == 0 && gs.page_fault_state.faulted_virtual_address == Q_UNMAPPED_VA,
	     "LX_DXGETDEVICESTATE", "PAGE_FAULT: the faulted VA", ret, "the unmapped VA",
	     "faulted_virtual_address 0x%llx",
	     (unsigned long long)gs.page_fault_state.faulted_virtual_address);
	v = 1;
	ret = wait_cpu(t->fd, dev2, &q2.queue_progress_fence, &v, 1, 0, 0);
	note(r, ret < 0, "LX_DXWAITFORSYNCHRONIZATIONOBJECTFROMCPU",
	     "the faulted queue's progress fence fails at once", ret, "an error", NULL);
	ret = submit_hwqueue(t->fd, q2.queue, Q_UNMAPPED_VA, 64, 2);
	EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "on the faulted device", ret, -EIO, NULL);
	ret = submit_command(t->fd, ctx2, Q_UNMAPPED_VA, 64);
	EXPECT(r, LX_DXSUBMITCOMMAND, "on the faulted device", ret, -EIO, NULL);
	ret = get_state(t->fd, t->device, _D3DKMT_DEVICESTATE_EXECUTION, &gs);
	note(r, ret == 0 && gs.execution_state == _D3DKMT_DEVICEEXECUTION_ACTIVE,
	     "LX_DXGETDEVICESTATE", "the first device is still active", ret, "ACTIVE",
	     "state %d", (int)gs.execution_state);

	if (q_device(t, "a third device, to mark", &dev3, &ctx3) == 0) {
		memset(&me, 0, sizeof(me));
		me.device = dev3;
		ret = dx(t->fd, LX_DXMARKDEVICEASERROR, &me);
		EXPECT(r, LX_DXMARKDEVICEASERROR, "the third device", ret, 0, NULL);
		ret = get_state(t->fd, dev3, _D3DKMT_DEVICESTATE_EXECUTION, &gs);
		note(r, ret == 0 && gs.execution_state == _D3DKMT_DEVICEEXECUTION_RESET,
		     "LX_DXGETDEVICESTATE", "the marked device", ret, "RESET", "state %d",
		     (int)gs.execution_state);
		me.device = mem_bogus;
		ret = dx(t->fd, LX_DXMARKDEVICEASERROR, &me);
		EXPECT(r, LX_DXMARKDEVICEASERROR, "bad device handle", ret, -EBADF, NULL);
		memset(&dd, 0, sizeof(dd));
		dd.device = dev3;
		ret = dx(t->fd, LX_DXDESTROYDEVICE, &dd);
		EXPECT(r, LX_DXDESTROYDEVICE, "the marked device", ret, 0, NULL);
	}
	ret = get_state(t->fd, t->device, _D3DKMT_DEVICESTATE_EXECUTION, &gs);
	note(r, ret == 0 && gs.execution_state == _D3DKMT_DEVICEEXECUTION_ACTIVE,
	     "LX_DXGETDEVICESTATE", "the first device is active after all that", ret, "ACTIVE",
	     "state %d", (int)gs.execution_state);
	ret = destroy_hwqueue(t->fd, q2.queue);
	EXPECT(r, LX_DXDESTROYHWQUEUE, "the faulted device's queue", ret, 0, NULL);
	memset(&dd, 0, sizeof(dd));
	dd.device = dev2;
	ret = dx(t->fd, LX_DXDESTROYDEVICE, &dd);
	EXPECT(r, LX_DXDESTROYDEVICE, "the faulted device", ret, 0, NULL);
}

/* 7. QueryStatistics (pydxg's record) and InvalidateCache. */
static void q_statistics(struct queuetest *t, struct winluid luid)
{
	struct run *r = t->r;
	struct pydxg_stats st;
	struct winluid none = { 0, 0 };
	__u64 pid = (__u64)getpid();
	int ret;

	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_PROCESS_ADAPTER, pid, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "this process on the adapter", ret, 0,
	       "%llu command buffers, %llu commands, %llu ns, %llu faults, %llu resets, "
	       "%llu bytes committed", (unsigned long long)st.command_buffers,
	       (unsigned long long)st.commands, (unsigned long long)st.engine_busy_ns,
	       (unsigned long long)st.faults, (unsigned long long)st.resets,
	       (unsigned long long)st.committed_local);
	note(r, ret == 0 && st.magic == STATS_MAGIC && st.version == 2 &&
		     st.size == sizeof(st) && st.type == _D3DKMT_QUERYSTATISTICS_PROCESS_ADAPTER,
	     "LX_DXQUERYSTATISTICS", "a pydxg v2 record", ret, "magic PDXQ, version 2", NULL);
	note(r, ret == 0 && st.faults >= 1 && st.resets >= 1 && st.hwqueues >= 1 &&
		     st.allocations >= 4 && st.committed_local >= 4 * Q_DATA_SIZE,
	     "LX_DXQUERYSTATISTICS", "the fault, the reset, the queue and the memory counted",
	     ret, "faults, resets >= 1", NULL);
	if (t->peer)
		note(r, ret == 0 && st.command_buffers == 3 && st.commands == 4 &&
			     st.engine_busy_ns > 0, "LX_DXQUERYSTATISTICS",
		     "the three command buffers counted", ret,
		     "3 buffers, 4 commands, engine time", "%llu buffers, %llu commands",
		     (unsigned long long)st.command_buffers, (unsigned long long)st.commands);
	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_ADAPTER, 0, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "the adapter", ret, 0, "%llu processes, %llu devices",
	       (unsigned long long)st.processes, (unsigned long long)st.devices);
	note(r, ret == 0 && st.processes >= 1 && st.local_capacity > 0, "LX_DXQUERYSTATISTICS",
	     "the adapter's users and capacity", ret, "at least this process", NULL);
	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_PROCESS, pid, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "this process everywhere", ret, 0, NULL);
	ret = query_stats(t->fd, none, _D3DKMT_QUERYSTATISTICS_ADAPTER, 0, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "an unknown LUID", ret, -EINVAL, NULL);
	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_PROCESS_ADAPTER, 0, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "PROCESS_ADAPTER without a process", ret, -EINVAL, NULL);
	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_PROCESS_ADAPTER, 0x7ffffffe, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "a PID no process has", ret, -EINVAL, NULL);
	ret = query_stats(t->fd, luid, _D3DKMT_QUERYSTATISTICS_NODE, pid, &st);
	EXPECT(r, LX_DXQUERYSTATISTICS, "NODE (not supported)", ret, -EPERM, NULL);

	ret = invalidate(t->fd, t->device, t->a, 0, Q_DATA_SIZE);
	EXPECT(r, LX_DXINVALIDATECACHE, "a data buffer", ret, 0, NULL);
	ret = invalidate(t->fd, t->device, t->a, Q_DATA_SIZE, 1);
	EXPECT(r, LX_DXINVALIDATECACHE, "past its end", ret, -EINVAL, NULL);
	ret = invalidate(t->fd, t->device, mem_bogus, 0, 1);
	EXPECT(r, LX_DXINVALIDATECACHE, "bad allocation handle", ret, -EBADF, NULL);
	ret = invalidate(t->fd, mem_bogus, t->a, 0, 1);
	EXPECT(r, LX_DXINVALIDATECACHE, "bad device handle", ret, -EBADF, NULL);
}

/* The queue test on one adapter: everything gone again at the end. */
static void hwqueues(struct run *r, int fd, const struct d3dkmt_adapterinfo *info, int peer)
{
	struct queuetest t;
	struct d3dkmt_destroydevice dd;
	int ret;

	memset(&t, 0, sizeof(t));
	t.r = r;
	t.fd = fd;
	t.peer = peer;
	t.adapter = info->adapter_handle;
	if (q_device(&t, "for hardware queues", &t.device, &t.context))
		return;
	if (q_create(&t) == 0) {
		q_priorities(&t);
		if (q_memory(&t) == 0 && peer)
			q_execute(&t);
		q_fences(&t);
		q_faults(&t);
		q_statistics(&t, info->adapter_luid);
		ret = destroy_hwqueue(fd, t.queue);
		EXPECT(r, LX_DXDESTROYHWQUEUE, "the queue", ret, 0, NULL);
		ret = destroy_hwqueue(fd, t.queue);
		EXPECT(r, LX_DXDESTROYHWQUEUE, "again (stale handle)", ret, -EBADF, NULL);
		ret = submit_hwqueue(fd, t.queue, t.cmd_va, 64, 3);
		EXPECT(r, LX_DXSUBMITCOMMANDTOHWQUEUE, "on the destroyed queue", ret, -EBADF, NULL);
	}
	memset(&dd, 0, sizeof(dd));
	dd.device = t.device;
	ret = dx(fd, LX_DXDESTROYDEVICE, &dd);
	EXPECT(r, LX_DXDESTROYDEVICE, "with its queue's memory", ret, 0, NULL);
}

/* Enumerate, run the queue test on the first adapter, close the adapters. */
static void queue_session(struct run *r, int fd, int peer)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	int n, i;

	memset(infos, 0, sizeof(infos));
	n = enum_adapters3(r, fd, infos);
	if (n < 0)
		return;
	hwqueues(r, fd, &infos[0], peer);
	for (i = 0; i < n; i++) {
		int rc = close_adapter(fd, infos[i].adapter_handle);

		EXPECT(r, LX_DXCLOSEADAPTER, "EnumAdapters3 handle", rc, 0, "handle 0x%x",
		       infos[i].adapter_handle.v);
	}
}

/* One complete client session on `fd`. */
static void session(struct run *r, int fd, int with_errors)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	int n, i;

	memset(infos, 0, sizeof(infos));
	n = enum_adapters3(r, fd, infos);
	if (n < 0)
		return;
	enum_adapters2(r, fd);
	for (i = 0; i < n; i++)
		query_adapter(r, fd, &infos[i]);
	device_and_context(r, fd, infos[0].adapter_luid);
	if (with_errors)
		error_paths(r, fd, infos[0].adapter_handle);
	for (i = 0; i < n; i++) {
		int rc = close_adapter(fd, infos[i].adapter_handle);

		EXPECT(r, LX_DXCLOSEADAPTER, "EnumAdapters3 handle", rc, 0, "handle 0x%x",
		       infos[i].adapter_handle.v);
	}
}

static int mode_all(struct run *r)
{
	int fd = open_dev(r);

	if (fd < 0)
		return 1;
	session(r, fd, 1);
	memory_session(r, fd);
	sync_session(r, fd);
	queue_session(r, fd, 0);
	close(fd);
	return 0;
}

static int mode_queue(struct run *r, int peer)
{
	int fd = open_dev(r);

	if (fd < 0)
		return 1;
	queue_session(r, fd, peer);
	close(fd);
	return 0;
}

static int mode_sync(struct run *r)
{
	int fd = open_dev(r);

	if (fd < 0)
		return 1;
	sync_session(r, fd);
	close(fd);
	return 0;
}

static int mode_memory(struct run *r)
{
	int fd = open_dev(r);

	if (fd < 0)
		return 1;
	memory_session(r, fd);
	close(fd);
	return 0;
}

struct worker {
	struct run run;
	pthread_t thread;
	int fd;
	int iterations;
	char tag[16];
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	int i;

	for (i = 0; i < w->iterations; i++)
		session(&w->run, w->fd, i == 0);
	return NULL;
}

static int mode_threads(struct run *r, int threads, int iterations)
{
	struct worker *ws = calloc((size_t)threads, sizeof(*ws));
	int fd = open_dev(r);
	int i;

	if (!ws || fd < 0)
		return 1;
	for (i = 0; i < threads; i++) {
		ws[i].run = *r;
		ws[i].run.checks = ws[i].run.failures = 0;
		ws[i].run.verbose = r->verbose && i == 0;
		snprintf(ws[i].tag, sizeof(ws[i].tag), "[t%d] ", i);
		ws[i].run.tag = ws[i].tag;
		ws[i].fd = fd;
		ws[i].iterations = iterations;
		if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
			printf("FAIL pthread_create\n");
			return 1;
		}
	}
	for (i = 0; i < threads; i++) {
		pthread_join(ws[i].thread, NULL);
		r->checks += ws[i].run.checks;
		r->failures += ws[i].run.failures;
	}
	printf("ok   %d threads x %d sessions on one descriptor: %d checks, %d failures\n",
	       threads, iterations, r->checks, r->failures);
	free(ws);
	close(fd);
	return 0;
}

static int mode_fork(struct run *r)
{
	struct d3dkmt_enumadapters3 e;
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	struct d3dkmt_openadapterfromluid o;
	int fd = open_dev(r), ret, status;
	pid_t child;

	if (fd < 0)
		return 1;
	memset(infos, 0, sizeof(infos));
	if (enum_adapters3(r, fd, infos) < 0)
		return 1;
	fflush(stdout);
	child = fork();
	if (child < 0) {
		printf("FAIL fork: %s\n", strerror(errno));
		return 1;
	}
	if (child == 0) {
		struct run c = *r;
		int fd2;

		c.tag = "[child] ";
		c.checks = c.failures = 0;
		memset(&e, 0, sizeof(e));
		e.filter.include_compute_only = 1;
		ret = dx(fd, LX_DXENUMADAPTERS3, &e);
		EXPECT(&c, LX_DXENUMADAPTERS3, "child on the parent's descriptor", ret, -ENOTTY,
		       NULL);
		memset(&o, 0, sizeof(o));
		o.adapter_luid = infos[0].adapter_luid;
		ret = dx(fd, LX_DXOPENADAPTERFROMLUID, &o);
		EXPECT(&c, LX_DXOPENADAPTERFROMLUID, "child on the parent's descriptor", ret,
		       -ENOTTY, NULL);
		ret = query_info(fd, infos[0].adapter_handle, KMTQAITYPE_ADAPTERTYPE, &e, 4);
		EXPECT(&c, LX_DXQUERYADAPTERINFO, "child with the parent's handle and descriptor",
		       ret, -ENOTTY, NULL);
		close(fd);
		fd2 = open_dev(&c);
		if (fd2 >= 0) {
			session(&c, fd2, 0);
			close(fd2);
		}
		fflush(stdout);
		_exit(c.failures ? 1 : 0);
	}
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
		r->failures++;
		printf("FAIL child exited with status 0x%x\n", status);
	} else if (r->verbose) {
		printf("ok   child reopened the file and ran a full session\n");
	}
	memset(&e, 0, sizeof(e));
	e.filter.include_compute_only = 1;
	ret = dx(fd, LX_DXENUMADAPTERS3, &e);
	EXPECT(r, LX_DXENUMADAPTERS3, "parent after the child", ret, 0, "%u adapters",
	       e.adapter_count);
	ret = query_info(fd, infos[0].adapter_handle, KMTQAITYPE_ADAPTERTYPE, &e, 4);
	EXPECT(r, LX_DXQUERYADAPTERINFO, "parent's handle still valid", ret, 0, NULL);
	close(fd);
	return 0;
}

static int mode_hold(struct run *r)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	struct d3dkmt_openadapterfromluid o;
	struct d3dkmt_createdevice cd;
	struct d3dkmt_createcontextvirtual cv;
	char c;
	int fd = open_dev(r), ret;

	if (fd < 0)
		return 1;
	memset(infos, 0, sizeof(infos));
	if (enum_adapters3(r, fd, infos) < 0)
		return 1;
	memset(&o, 0, sizeof(o));
	o.adapter_luid = infos[0].adapter_luid;
	ret = dx(fd, LX_DXOPENADAPTERFROMLUID, &o);
	EXPECT(r, LX_DXOPENADAPTERFROMLUID, "hold", ret, 0, NULL);
	memset(&cd, 0, sizeof(cd));
	cd.adapter = o.adapter_handle;
	ret = dx(fd, LX_DXCREATEDEVICE, &cd);
	EXPECT(r, LX_DXCREATEDEVICE, "hold", ret, 0, NULL);
	memset(&cv, 0, sizeof(cv));
	cv.device = cd.device;
	ret = dx(fd, LX_DXCREATECONTEXTVIRTUAL, &cv);
	EXPECT(r, LX_DXCREATECONTEXTVIRTUAL, "hold", ret, 0, NULL);
	if (r->failures)
		return 1;
	printf("ready pid %d device 0x%x context 0x%x\n", (int)getpid(), cd.device.v,
	       cv.context.v);
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	return 0; /* exit with everything still open: closing the file must tear it down */
}

struct sleeper {
	pthread_t thread;
	int fd;
	struct d3dkmthandle adapter;
	unsigned int ms;
	int ret;
	unsigned int status;
};

static void *sleeper_main(void *arg)
{
	struct sleeper *s = arg;

	s->ret = pydxg_escape(s->fd, s->adapter, PYDXG_ESCAPE_SLEEP, s->ms, &s->status);
	return NULL;
}

static int mode_sleep(struct run *r, int threads, unsigned int ms)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	struct sleeper *ss = calloc((size_t)threads, sizeof(*ss));
	int fd = open_dev(r), i;

	if (!ss || fd < 0)
		return 1;
	memset(infos, 0, sizeof(infos));
	if (enum_adapters3(r, fd, infos) < 0)
		return 1;
	printf("sleeping pid %d threads %d ms %u\n", (int)getpid(), threads, ms);
	fflush(stdout);
	for (i = 0; i < threads; i++) {
		ss[i].fd = fd;
		ss[i].adapter = infos[0].adapter_handle;
		ss[i].ms = ms;
		if (pthread_create(&ss[i].thread, NULL, sleeper_main, &ss[i]) != 0) {
			printf("FAIL pthread_create\n");
			return 1;
		}
	}
	for (i = 0; i < threads; i++) {
		pthread_join(ss[i].thread, NULL);
		EXPECT(r, LX_DXESCAPE, "pydxg SLEEP", ss[i].ret, 0, "status 0x%x", ss[i].status);
	}
	free(ss);
	close(fd);
	return 0;
}

static int cmp_ll(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;

	return (x > y) - (x < y);
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void bench_report(const char *name, long long *t, int n)
{
	long long sum = 0;
	int i;

	for (i = 0; i < n; i++)
		sum += t[i];
	qsort(t, (size_t)n, sizeof(*t), cmp_ll);
	printf("bench %s n=%d p50_us=%.1f p99_us=%.1f mean_us=%.1f\n", name, n,
	       t[n / 2] / 1e3, t[(n * 99) / 100] / 1e3, sum / 1e3 / n);
}

static int mode_bench(struct run *r, int iterations)
{
	struct d3dkmt_adapterinfo infos[MAX_ADAPTERS];
	struct d3dkmt_enumadapters3 e;
	D3DKMT_ADAPTERTYPE type;
	long long *t = calloc((size_t)iterations, sizeof(long long)), t0;
	int fd = open_dev(r), i, ret;

	if (!t || fd < 0 || iterations < 1)
		return 1;
	memset(infos, 0, sizeof(infos));
	if (enum_adapters3(r, fd, infos) < 0)
		return 1;
	for (i = 0; i < iterations; i++) {
		memset(&e, 0, sizeof(e));
		e.filter.include_compute_only = 1;
		t0 = now_ns();
		ret = dx(fd, LX_DXENUMADAPTERS3, &e);
		t[i] = now_ns() - t0;
		if (ret != 0) {
			EXPECT(r, LX_DXENUMADAPTERS3, "bench", ret, 0, NULL);
			return 1;
		}
	}
	bench_report("LX_DXENUMADAPTERS3_count", t, iterations);
	for (i = 0; i < iterations; i++) {
		t0 = now_ns();
		ret = query_info(fd, infos[0].adapter_handle, KMTQAITYPE_ADAPTERTYPE, &type,
				 sizeof(type));
		t[i] = now_ns() - t0;
		if (ret != 0) {
			EXPECT(r, LX_DXQUERYADAPTERINFO, "bench", ret, 0, NULL);
			return 1;
		}
	}
	bench_report("LX_DXQUERYADAPTERINFO_adaptertype", t, iterations);
	free(t);
	close(fd);
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: dxg_test [-q] [-p] [-a ADAPTERS] [-t THREADS] [-n ITERATIONS] PATH "
		"all|memory|sync|queue|threads|fork|hold|bench|sleep\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct run r = { .tag = "", .verbose = 1, .expect_adapters = -1 };
	int threads = 4, iterations = 3, peer = 0, opt, rc;
	const char *mode;

	while ((opt = getopt(argc, argv, "qpa:t:n:")) != -1) {
		switch (opt) {
		case 'q': r.verbose = 0; break;
		case 'p': peer = 1; break;
		case 'a': r.expect_adapters = atoi(optarg); break;
		case 't': threads = atoi(optarg); break;
		case 'n': iterations = atoi(optarg); break;
		default: return usage();
		}
	}
	if (argc - optind != 2 || threads < 1 || iterations < 1)
		return usage();
	r.path = argv[optind];
	mode = argv[optind + 1];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "all"))
		rc = mode_all(&r);
	else if (!strcmp(mode, "memory"))
		rc = mode_memory(&r);
	else if (!strcmp(mode, "sync"))
		rc = mode_sync(&r);
	else if (!strcmp(mode, "queue"))
		rc = mode_queue(&r, peer);
	else if (!strcmp(mode, "threads"))
		rc = mode_threads(&r, threads, iterations);
	else if (!strcmp(mode, "fork"))
		rc = mode_fork(&r);
	else if (!strcmp(mode, "hold"))
		rc = mode_hold(&r);
	else if (!strcmp(mode, "bench"))
		rc = mode_bench(&r, iterations);
	else if (!strcmp(mode, "sleep"))
		rc = mode_sleep(&r, threads, (unsigned int)iterations);
	else
		return usage();
	if (rc == 0 && r.failures == 0) {
		printf("PASS %s: %d checks\n", mode, r.checks);
		return 0;
	}
	printf("FAILED %s: %d of %d checks failed\n", mode, r.failures, r.checks);
	return 1;
}
