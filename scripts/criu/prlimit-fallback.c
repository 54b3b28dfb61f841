/*
 * prlimit-fallback: preloaded into CRIU by podmig's CRIU wrapper (scripts/setup).
 *
 * CRIU reads each dumped process's resource limits with prlimit64(pid, res, NULL, &old).
 * The kernel refuses that read (EPERM) when the caller's uids differ from the process's
 * and the caller lacks CAP_SYS_RESOURCE over it -- the case on machines whose root has
 * CAP_SYS_RESOURCE removed from its bounding set, where no process running as another
 * user (PostgreSQL as `postgres`) could be checkpointed. The same limits are published,
 * world-readable, in /proc/PID/limits; when (and only when) the kernel refuses the read,
 * this answers it from there. Writes of limits and every other system call pass through
 * unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

struct limit64 {
	uint64_t cur;
	uint64_t max;
};

/* One value of /proc/PID/limits: a number, or "unlimited" (RLIM64_INFINITY). */
static int parse_value(const char *s, uint64_t *out)
{
	char *end;

	while (*s == ' ')
		s++;
	if (strncmp(s, "unlimited", 9) == 0) {
		*out = UINT64_MAX;
		return 0;
	}
	errno = 0;
	*out = strtoull(s, &end, 10);
	return (errno || end == s) ? -1 : 0;
}

/*
 * The kernel prints one line per resource, in resource order, after a header line:
 * the name padded to 25 columns, then the soft and the hard limit padded to 20.
 */
static int limits_from_proc(long pid, long res, struct limit64 *out)
{
	char path[64], line[256];
	long i = -1;
	int ret = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%ld/limits", pid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (i++ != res)
			continue;
		if (strlen(line) > 47 && parse_value(line + 26, &out->cur) == 0 &&
		    parse_value(line + 47, &out->max) == 0)
			ret = 0;
		break;
	}
	fclose(f);
	return ret;
}

long syscall(long number, ...)
{
	static long (*real)(long, ...);
	long a[6], r;
	va_list ap;
	int i;

	va_start(ap, number);
	for (i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	if (!real)
		real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
	r = real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
	if (r == -1 && errno == EPERM && number == SYS_prlimit64 && a[2] == 0 && a[3] != 0) {
		if (limits_from_proc(a[0], a[1], (struct limit64 *)a[3]) == 0) {
			errno = 0;
			return 0;
		}
		errno = EPERM;
	}
	return r;
}
