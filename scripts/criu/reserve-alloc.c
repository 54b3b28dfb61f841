/*
 * reserve-alloc: preloaded into CRIU by podmig's CRIU wrapper (scripts/setup), beside
 * prlimit-fallback.c in the same shared object.
 *
 * Why: a lazy dump (`criu dump --lazy-pages`) allocates its page pipe's iovec array with
 * malloc, sized for one iovec per page of every private mapping of the task
 * (criu/mem.c __parasite_dump_pages_seized -> create_page_pipe(nr_priv_pages, NULL, ..)),
 * whether or not a page of the mapping was ever touched. Processes that reserve address
 * space up front -- MariaDB 10.11 maps 8 TiB PROT_NONE at start, and JVMs, Go's runtime
 * and allocators reserve similarly -- make that 16 bytes x 2^31 pages = 32 GiB, which the
 * kernel's default overcommit heuristic refuses on any node with less memory than that:
 * "page-pipe: create_page_pipe: Can't allocate 34364860720 bytes", the move fails before
 * the freeze. Only the entries for pages actually present are ever written. A full dump
 * does not fail: its iovecs live in the parasite's memfd, which is never committed.
 *
 * With that allocation granted, the same function then copies the whole array -- its
 * capacity, pp->nr_iovs, not the pp->free_iov entries in use -- into the parasite's
 * argument area (`memcpy(pargs_iovs(args), pp->iovs, sizeof(struct iovec) * pp->nr_iovs)`),
 * a memfd: 32 GiB of shared memory written, and the node's OOM killer ends CRIU or a
 * neighbour (measured here: the dump reached 23.7 GB of shmem before it was killed).
 *
 * The lazy restore then meets the same reservation: with lazy pages CRIU premaps every
 * private mapping in the restoring task (criu/pagemap.c: pieok is false under
 * --lazy-pages; criu/mem.c premap_private_vma) with `prot | PROT_WRITE` and the source's
 * flags. A PROT_NONE reservation is not charged against the commit limit at the source,
 * but once writable it is -- unless it was mapped MAP_NORESERVE, which MariaDB's is not --
 * and 8 TiB is refused: "Unable to map ANON_VMA: Cannot allocate memory" (a full restore
 * maps it in the restorer with its own protection and is not affected).
 *
 * What:
 * - a private anonymous mmap of BIG_ALLOC bytes or more gets MAP_NORESERVE: memory is
 *   still given on first touch as before; only the up-front charge is not made. The
 *   restored process's reservation then shows "nr" in its VmFlags: where the application
 *   later makes part of it writable, that part is not charged either (under the default
 *   heuristic overcommit nothing else changes);
 * - an allocation of BIG_ALLOC bytes or more is served by an anonymous mmap with
 *   MAP_NORESERVE (not charged against the commit limit; only the pages written use
 *   memory), and freed or resized as such. Everything smaller goes to glibc unchanged;
 * - a memcpy whose source is such a mapping copies only up to the mapping's last page
 *   that was ever touched (mincore): the rest of the source was never written and reads
 *   as zeros, and CRIU's parasite reads only the iovecs in use (a prefix: the page pipe
 *   fills them in order). Every other memcpy is glibc's.
 * Both are CRIU bugs (checked against CRIU's master of late 2026: criu/mem.c still sizes
 * and copies by nr_priv_pages / nr_iovs); the fix upstream would copy pp->free_iov entries
 * and size the lazy page pipe by the pages present. Remove this file when the CRIU that
 * scripts/setup installs carries that.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Sizes from which an allocation becomes its own NORESERVE mapping. */
#define BIG_ALLOC (64UL << 20)
/* How many such allocations may live at once (CRIU holds one per dumped task). */
#define SLOTS 256

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);

static struct {
	void *p;
	size_t len;
} slots[SLOTS];
static int lock;
/* How many slots are in use: every free() and realloc() asks whether its pointer is a
 * mapping of this file, and while none lives (nearly always) that costs one load. */
static int live;

static void take(void)
{
	while (__atomic_exchange_n(&lock, 1, __ATOMIC_ACQUIRE))
		;
}

static void give(void)
{
	__atomic_store_n(&lock, 0, __ATOMIC_RELEASE);
}

/* The slot holding p (NULL: a free slot), or -1; the caller holds the lock. */
static int slot_of(const void *p)
{
	int i;

	for (i = 0; i < SLOTS; i++)
		if (slots[i].p == p)
			return i;
	return -1;
}

/* A NORESERVE mapping of n bytes, recorded; NULL with errno ENOMEM when none can be had. */
static void *big_map(size_t n)
{
	size_t len = (n + 4095) & ~(size_t)4095;
	void *p;
	int i;

	if (len < n) {
		errno = ENOMEM;
		return NULL;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		errno = ENOMEM;
		return NULL;
	}
	take();
	i = slot_of(NULL);
	if (i >= 0) {
		slots[i].p = p;
		slots[i].len = len;
		__atomic_add_fetch(&live, 1, __ATOMIC_RELEASE);
	}
	give();
	if (i < 0) {
		munmap(p, len);
		errno = ENOMEM;
		return NULL;
	}
	return p;
}

/* The length of p's mapping if this file mapped it (forgetting it when `forget`), else 0. */
static size_t big_len(const void *p, int forget)
{
	size_t len = 0;
	int i;

	if (!p || !__atomic_load_n(&live, __ATOMIC_ACQUIRE))
		return 0;
	take();
	i = slot_of(p);
	if (i >= 0) {
		len = slots[i].len;
		if (forget) {
			slots[i].p = NULL;
			slots[i].len = 0;
			__atomic_sub_fetch(&live, 1, __ATOMIC_RELEASE);
		}
	}
	give();
	return len;
}

/* mmap, with MAP_NORESERVE for large private anonymous mappings (see the header). */
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long r;

	if ((flags & MAP_PRIVATE) && (flags & MAP_ANONYMOUS) && len >= BIG_ALLOC)
		flags |= MAP_NORESERVE;
	r = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
	return r == -1 ? MAP_FAILED : (void *)r;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}

void *malloc(size_t n)
{
	return n >= BIG_ALLOC ? big_map(n) : __libc_malloc(n);
}

void *calloc(size_t n, size_t size)
{
	size_t total;

	if (__builtin_mul_overflow(n, size, &total)) {
		errno = ENOMEM;
		return NULL;
	}
	/* Fresh anonymous mappings are zero-filled. */
	return total >= BIG_ALLOC ? big_map(total) : __libc_calloc(n, size);
}

void free(void *p)
{
	size_t len = big_len(p, 1);

	if (len)
		munmap(p, len);
	else
		__libc_free(p);
}

size_t malloc_usable_size(void *p)
{
	static size_t (*real)(void *);
	size_t len = big_len(p, 0);

	if (len)
		return len;
	if (!real)
		real = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
	return real ? real(p) : 0;
}

void *realloc(void *p, size_t n)
{
	size_t old = big_len(p, 0), keep;
	void *q;

	if (!p)
		return malloc(n);
	if (n == 0) {
		free(p);
		return NULL;
	}
	if (!old && n < BIG_ALLOC)
		return __libc_realloc(p, n);
	/* One side is a mapping of this file: move the bytes over. */
	q = malloc(n);
	if (!q)
		return NULL;
	if (!old)
		old = malloc_usable_size(p);
	keep = old < n ? old : n;
	memcpy(q, p, keep);
	free(p);
	return q;
}

/*
 * memcpy from a mapping of this file copies only its touched prefix (see the header). mincore
 * reports a page of a private anonymous mapping resident once it was touched (written, or
 * read through the zero page); a page never touched reads as zero and is not copied.
 */
void *memcpy(void *dst, const void *src, size_t n)
{
	/* glibc's memmove does the copying: memcpy's contract is a subset of it. */
	size_t len = n >= BIG_ALLOC ? big_len(src, 0) : 0;

	if (len && n <= len) {
		size_t pages = (n + 4095) / 4096, chunk = 1UL << 20, end = 0;
		unsigned char *vec = mmap(NULL, chunk, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (vec != MAP_FAILED) {
			/* From the end backwards: the first resident page found ends the prefix. */
			size_t hi = pages;

			while (hi > 0 && end == 0) {
				size_t lo = hi > chunk ? hi - chunk : 0, i;

				if (mincore((char *)src + lo * 4096, (hi - lo) * 4096, vec) != 0) {
					end = n; /* cannot tell: copy all */
					break;
				}
				for (i = hi - lo; i > 0; i--)
					if (vec[i - 1] & 1) {
						end = (lo + i) * 4096;
						break;
					}
				hi = lo;
			}
			munmap(vec, chunk);
			if (end > n)
				end = n;
			return memmove(dst, src, end);
		}
	}
	return memmove(dst, src, n);
}

void *reallocarray(void *p, size_t n, size_t size)
{
	size_t total;

	if (__builtin_mul_overflow(n, size, &total)) {
		errno = ENOMEM;
		return NULL;
	}
	return realloc(p, total);
}
