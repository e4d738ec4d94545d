/* SPDX-License-Identifier: MIT */
/*
 * dxg_test: an unmodified-style C client of /dev/dxg, run against pydxg's FUSE device file.
 *
 * It includes only the generated dxg_uapi.h (Linux d3dkmthk.h names plus the libdxg payload
 * typedefs), opens the file O_RDONLY | O_CLOEXEC like libdxg, and drives it with plain ioctl().
 * Every status is checked; each ioctl exercised prints one line ("ok ..." or "FAIL ...") and
 * the program exits non-zero on any unexpected status.
 *
 *   dxg_test [-q] [-a ADAPTERS] [-t THREADS] [-n ITERATIONS] PATH MODE
 *
 * MODE:
 *   all      every implemented ioctl and the error paths, once
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
	fprintf(stderr, "usage: dxg_test [-q] [-a ADAPTERS] [-t THREADS] [-n ITERATIONS] PATH "
		"all|threads|fork|hold|bench|sleep\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct run r = { .tag = "", .verbose = 1, .expect_adapters = -1 };
	int threads = 4, iterations = 3, opt, rc;
	const char *mode;

	while ((opt = getopt(argc, argv, "qa:t:n:")) != -1) {
		switch (opt) {
		case 'q': r.verbose = 0; break;
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
