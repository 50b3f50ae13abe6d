using System.Runtime.InteropServices;

namespace OffloadRpc.Interop;

/// <summary>
/// The libc calls the transport needs that .NET does not expose: memfd segments and their seals,
/// mappings, the shared (not process-private) futex, and file-descriptor passing over a Unix socket.
/// Every wrapper returns -1 / null on failure with <see cref="Marshal.GetLastPInvokeError"/> set.
/// </summary>
internal static unsafe partial class LinuxNative
{
    private const string Libc = "libc";

    public const int MFD_CLOEXEC = 0x0001;
    public const int MFD_ALLOW_SEALING = 0x0002;

    public const int F_GETFL = 3;
    public const int F_SETFL = 4;
    public const int O_NONBLOCK = 0x800;
    public const int F_ADD_SEALS = 1033;
    public const int F_GET_SEALS = 1034;
    public const int F_SEAL_SEAL = 0x0001;
    public const int F_SEAL_SHRINK = 0x0002;
    public const int F_SEAL_GROW = 0x0004;
    public const int F_SEAL_WRITE = 0x0008;

    public const int PROT_READ = 0x1;
    public const int PROT_WRITE = 0x2;
    public const int MAP_SHARED = 0x01;
    public const int MAP_POPULATE = 0x08000;
    public static readonly nint MAP_FAILED = -1;

    public const int SEEK_END = 2;

    public const int SOL_SOCKET = 1;
    public const int SCM_RIGHTS = 1;
    public const int SO_PEERCRED = 17;
    public const int MSG_NOSIGNAL = 0x4000;
    public const int MSG_CMSG_CLOEXEC = 0x40000000;
    public const int MSG_CTRUNC = 0x08;
    public const int MSG_DONTWAIT = 0x40;

    public const int EINTR = 4;
    public const int EAGAIN = 11;
    public const int ETIMEDOUT = 110;
    public const int ENOSYS = 38;

    private static readonly long s_sysFutex = LinuxAbi.Current.SysFutex;
    private const int FUTEX_WAIT = 0;
    private const int FUTEX_WAKE = 1;

    [LibraryImport(Libc, EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MemfdCreate(string name, uint flags);

    /// <summary>memfd_create, the descriptor owned by a handle from the moment it exists (an invalid handle on failure).</summary>
    [LibraryImport(Libc, EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial SafeMemfdHandle MemfdCreateHandle(string name, uint flags);

    [LibraryImport(Libc, EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(int fd, int cmd, int arg);

    // The SafeMemfdHandle overloads hold a reference on the handle across the call (the marshaller's
    // DangerousAddRef/DangerousRelease): a concurrent Dispose cannot close the descriptor under it.

    [LibraryImport(Libc, EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(SafeMemfdHandle fd, int cmd, int arg);

    [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int Ftruncate(int fd, long length);

    [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int Ftruncate(SafeMemfdHandle fd, long length);

    [LibraryImport(Libc, EntryPoint = "lseek", SetLastError = true)]
    public static partial long Lseek(int fd, long offset, int whence);

    [LibraryImport(Libc, EntryPoint = "lseek", SetLastError = true)]
    public static partial long Lseek(SafeMemfdHandle fd, long offset, int whence);

    public const long TMPFS_MAGIC = 0x0102_1994;

    [LibraryImport(Libc, EntryPoint = "fstatfs", SetLastError = true)]
    private static partial int Fstatfs(SafeMemfdHandle fd, byte* buffer);

    /// <summary>f_type of the file system holding <paramref name="fd"/> (the first field of struct statfs), or -1.</summary>
    public static long FileSystemType(SafeMemfdHandle fd)
    {
        byte* buffer = stackalloc byte[256];
        return Fstatfs(fd, buffer) == 0 ? *(long*)buffer : -1;
    }

    [LibraryImport(Libc, EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport(Libc, EntryPoint = "mmap", SetLastError = true)]
    public static partial nint Mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport(Libc, EntryPoint = "mmap", SetLastError = true)]
    public static partial nint Mmap(nint addr, nuint length, int prot, int flags, SafeMemfdHandle fd, long offset);

    [LibraryImport(Libc, EntryPoint = "munmap", SetLastError = true)]
    public static partial int Munmap(nint addr, nuint length);

    [LibraryImport(Libc, EntryPoint = "syscall", SetLastError = true)]
    private static partial long Syscall6(long number, nint a1, nint a2, nint a3, nint a4, nint a5, nint a6);

    [LibraryImport(Libc, EntryPoint = "sendmsg", SetLastError = true)]
    private static partial nint SendMsg(int fd, MsgHdr* msg, int flags);

    [LibraryImport(Libc, EntryPoint = "recvmsg", SetLastError = true)]
    private static partial nint RecvMsg(int fd, MsgHdr* msg, int flags);

    [LibraryImport(Libc, EntryPoint = "getpid")]
    public static partial int GetPid();

    [LibraryImport(Libc, EntryPoint = "geteuid")]
    public static partial uint GetEuid();

    [StructLayout(LayoutKind.Sequential)]
    private struct IoVec
    {
        public void* Base;
        public nuint Length;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct MsgHdr
    {
        public void* Name;
        public uint NameLength;
        public IoVec* Iov;
        public nuint IovLength;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }

    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } followed by data aligned to 8.
    private const int CmsgHeaderSize = 16;
    public const int MaxFdsPerMessage = 4;
    private const int ControlBufferSize = CmsgHeaderSize + MaxFdsPerMessage * sizeof(int);

    /// <summary>Waits while <paramref name="word"/> holds <paramref name="expected"/>; a shared futex (not private), so another process can wake it.</summary>
    /// <returns>0 when woken or the value differed, -1 with errno ETIMEDOUT / EINTR / EAGAIN otherwise.</returns>
    public static int FutexWait(int* word, int expected, int timeoutMilliseconds)
    {
        if (timeoutMilliseconds < 0)
        {
            return (int)Syscall6(s_sysFutex, (nint)word, FUTEX_WAIT, expected, 0, 0, 0);
        }

        long* timespec = stackalloc long[2];
        timespec[0] = timeoutMilliseconds / 1000;
        timespec[1] = (timeoutMilliseconds % 1000) * 1_000_000L;
        return (int)Syscall6(s_sysFutex, (nint)word, FUTEX_WAIT, expected, (nint)timespec, 0, 0);
    }

    /// <summary>Wakes up to <paramref name="count"/> waiters on a shared futex word; returns how many woke.</summary>
    public static int FutexWake(int* word, int count) => (int)Syscall6(s_sysFutex, (nint)word, FUTEX_WAKE, count, 0, 0, 0);

    /// <summary>
    /// Sends what the socket buffer takes of <paramref name="data"/> without blocking, with
    /// <paramref name="fds"/> attached to its first byte (pass them only with a frame's first byte).
    /// </summary>
    /// <returns>Bytes sent (0 only for empty data), or -errno (-EAGAIN: the buffer is full, wait for POLLOUT).</returns>
    public static int SendSome(int socket, ReadOnlySpan<byte> data, ReadOnlySpan<int> fds)
    {
        if (fds.Length > MaxFdsPerMessage)
        {
            throw new ArgumentOutOfRangeException(nameof(fds));
        }

        byte* control = stackalloc byte[ControlBufferSize];
        fixed (byte* bytes = data)
        {
            IoVec iov = new() { Base = bytes, Length = (nuint)data.Length };
            MsgHdr msg = new() { Iov = &iov, IovLength = 1 };
            if (fds.Length > 0)
            {
                new Span<byte>(control, ControlBufferSize).Clear();
                *(nuint*)control = (nuint)(CmsgHeaderSize + fds.Length * sizeof(int));
                *(int*)(control + 8) = SOL_SOCKET;
                *(int*)(control + 12) = SCM_RIGHTS;
                fds.CopyTo(new Span<int>(control + CmsgHeaderSize, fds.Length));
                msg.Control = control;
                msg.ControlLength = (nuint)(CmsgHeaderSize + fds.Length * sizeof(int));
            }

            while (true)
            {
                nint n = SendMsg(socket, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n >= 0)
                {
                    return (int)n;
                }

                int errno = Marshal.GetLastPInvokeError();
                if (errno != EINTR)
                {
                    return -errno;
                }
            }
        }
    }

    public const short POLLIN = 0x001;
    public const short POLLOUT = 0x004;

    [LibraryImport(Libc, EntryPoint = "poll", SetLastError = true)]
    private static partial int PollRaw(void* fds, nuint count, int timeoutMilliseconds);

    /// <summary>Waits up to <paramref name="timeoutMilliseconds"/> for <paramref name="events"/> on one descriptor.</summary>
    /// <returns>The events that occurred (0 on timeout), or -errno.</returns>
    public static int Poll(int fd, short events, int timeoutMilliseconds)
    {
        // struct pollfd { int fd; short events; short revents; }
        int* pollfd = stackalloc int[2];
        pollfd[0] = fd;
        pollfd[1] = (ushort)events;
        int n = PollRaw(pollfd, 1, timeoutMilliseconds);
        if (n < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            return errno == EINTR ? 0 : -errno;
        }

        return n == 0 ? 0 : (ushort)(pollfd[1] >> 16);
    }

    /// <summary>
    /// Receives up to <paramref name="buffer"/>.Length bytes; file descriptors that arrive with them are
    /// stored in <paramref name="fds"/> (close-on-exec) and counted in <paramref name="fdCount"/>.
    /// </summary>
    /// <returns>Bytes read (0 at end of stream), or -errno (-EAGAIN: nothing to read now; the socket never blocks).</returns>
    public static int ReceiveWithFds(int socket, Span<byte> buffer, Span<int> fds, out int fdCount, out bool truncated)
    {
        fdCount = 0;
        truncated = false;
        byte* control = stackalloc byte[ControlBufferSize];
        fixed (byte* bytes = buffer)
        {
            while (true)
            {
                IoVec iov = new() { Base = bytes, Length = (nuint)buffer.Length };
                MsgHdr msg = new() { Iov = &iov, IovLength = 1, Control = control, ControlLength = ControlBufferSize };
                nint n = RecvMsg(socket, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
                if (n < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno == EINTR)
                    {
                        continue;
                    }

                    return -errno;
                }

                truncated = (msg.Flags & MSG_CTRUNC) != 0;
                if (msg.ControlLength >= CmsgHeaderSize)
                {
                    nuint cmsgLength = *(nuint*)control;
                    int level = *(int*)(control + 8);
                    int type = *(int*)(control + 12);
                    if (level == SOL_SOCKET && type == SCM_RIGHTS && cmsgLength >= CmsgHeaderSize && cmsgLength <= ControlBufferSize)
                    {
                        int count = (int)(cmsgLength - CmsgHeaderSize) / sizeof(int);
                        for (int i = 0; i < count; i++)
                        {
                            int fd = ((int*)(control + CmsgHeaderSize))[i];
                            if (fdCount < fds.Length)
                            {
                                fds[fdCount++] = fd;
                            }
                            else
                            {
                                Close(fd);
                                truncated = true;
                            }
                        }
                    }
                }

                return (int)n;
            }
        }
    }
}
