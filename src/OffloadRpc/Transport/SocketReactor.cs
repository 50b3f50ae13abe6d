using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Tasks.Sources;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// One epoll thread per process for every connection's socket: segment hand-overs, their
/// acknowledgements and liveness (end of stream) of all connections, and the handshakes' reads, are
/// driven from here instead of a blocked thread per socket. Registrations are one-shot: a socket is
/// reported once per <see cref="SocketRegistration.Arm"/>, so a handler never runs twice at once.
/// Handlers run on the epoll thread and must not block; asynchronous waits resume on the thread pool.
/// </summary>
internal sealed class SocketReactor
{
    private static readonly Lazy<SocketReactor> s_shared = new(() => new SocketReactor());

    private readonly int _epoll;
    private readonly ConcurrentDictionary<long, SocketRegistration> _registrations = new();
    private long _nextToken;

    private SocketReactor()
    {
        _epoll = LinuxNative.EpollCreate(LinuxNative.EPOLL_CLOEXEC);
        if (_epoll < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new OffloadRpcException($"epoll_create1 failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno}).");
        }

        // No captured ExecutionContext: the thread serves every connection of the process.
        new Thread(Run) { IsBackground = true, Name = "OffloadRpc sockets" }.UnsafeStart();
    }

    /// <summary>The process's reactor, started on first use.</summary>
    public static SocketReactor Shared => s_shared.Value;

    /// <summary>Sockets registered right now.</summary>
    public int Count => _registrations.Count;

    /// <summary>Registers <paramref name="socket"/> (not yet armed); the registration holds a reference on the handle until it is removed.</summary>
    public SocketRegistration Register(SafeHandle socket)
    {
        long token = Interlocked.Increment(ref _nextToken);
        var registration = new SocketRegistration(this, socket, token);
        _registrations[token] = registration;
        return registration;
    }

    internal int Control(int op, int fd, uint events, long token) => LinuxNative.EpollControl(_epoll, op, fd, events, (ulong)token);

    internal void Forget(long token) => _registrations.TryRemove(token, out _);

    private void Run()
    {
        const int Batch = 64;
        Span<uint> events = stackalloc uint[Batch];
        Span<ulong> tokens = stackalloc ulong[Batch];
        while (true)
        {
            int n = LinuxNative.EpollWait(_epoll, events, tokens, -1);
            if (n < 0)
            {
                if (-n != LinuxNative.EINTR)
                {
                    Trace.TraceError($"OffloadRpc: epoll_wait failed (errno {-n}); retrying.");
                    Thread.Sleep(10);
                }

                continue;
            }

            for (int i = 0; i < n; i++)
            {
                if (_registrations.TryGetValue((long)tokens[i], out SocketRegistration? registration))
                {
                    registration.Dispatch(events[i]);
                }
            }
        }
    }
}

/// <summary>
/// One socket in the <see cref="SocketReactor"/>: either a handler that runs on the epoll thread each
/// time the socket is ready (a connection's frames), or one awaited readiness at a time (a handshake).
/// </summary>
internal sealed class SocketRegistration : IValueTaskSource<uint>
{
    private const uint ReadEvents = LinuxNative.EPOLLIN | LinuxNative.EPOLLRDHUP;
    private const uint WriteEvents = LinuxNative.EPOLLOUT;

    private readonly SocketReactor _reactor;
    private readonly SafeHandle _socket;
    private readonly long _token;
    private readonly object _gate = new();
    private ManualResetValueTaskSourceCore<uint> _core = new() { RunContinuationsAsynchronously = true };
    private Action<uint>? _handler;
    private bool _added;
    private bool _waiting;
    private bool _removed;
    private bool _referenced;
    private CancellationTokenRegistration _cancellation;

    internal SocketRegistration(SocketReactor reactor, SafeHandle socket, long token)
    {
        _reactor = reactor;
        _socket = socket;
        _token = token;
        socket.DangerousAddRef(ref _referenced); // the descriptor number stays ours while epoll knows it
    }

    /// <summary>From now on <paramref name="handler"/> runs on the epoll thread whenever the socket is readable (after each <see cref="Arm"/>).</summary>
    public void SetHandler(Action<uint> handler)
    {
        lock (_gate)
        {
            Debug.Assert(!_waiting, "a handler replaces no pending wait");
            _handler = handler;
        }
    }

    /// <summary>Asks for one report when the socket is readable (or hung up).</summary>
    public void Arm() => Arm(ReadEvents);

    /// <summary>
    /// Waits, without a thread, until the socket is readable (<paramref name="write"/>: writable) or hung
    /// up; returns the epoll events. One wait at a time; cancellation ends it with <see cref="OperationCanceledException"/>.
    /// </summary>
    /// <param name="inline">Resume on the epoll thread (for short, non-blocking continuations of this library's own, like the server's half of a handshake); otherwise on the thread pool.</param>
    public ValueTask<uint> WaitAsync(bool write, CancellationToken cancellationToken, bool inline = false)
    {
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_removed, this);
            Debug.Assert(_handler is null && !_waiting, "one awaited readiness at a time, and none with a handler");
            _core.Reset();
            _core.RunContinuationsAsynchronously = !inline;
            _waiting = true;
        }

        var task = new ValueTask<uint>(this, _core.Version);
        if (cancellationToken.CanBeCanceled)
        {
            _cancellation = cancellationToken.UnsafeRegister(static (state, token) => ((SocketRegistration)state!).Complete(0, new OperationCanceledException(token)), this);
        }

        Arm(write ? WriteEvents | LinuxNative.EPOLLRDHUP : ReadEvents);
        return task;
    }

    private void Arm(uint events)
    {
        lock (_gate)
        {
            if (_removed)
            {
                return;
            }

            int fd = (int)_socket.DangerousGetHandle();
            uint armed = events | LinuxNative.EPOLLONESHOT;
            int errno = _reactor.Control(_added ? LinuxNative.EPOLL_CTL_MOD : LinuxNative.EPOLL_CTL_ADD, fd, armed, _token);
            _added = true;
            if (errno != 0)
            {
                // The socket cannot be watched (closed under us): report it as hung up rather than never.
                ThreadPool.UnsafeQueueUserWorkItem(static s => s.registration.Dispatch(LinuxNative.EPOLLERR), (registration: this, errno), preferLocal: false);
            }
        }
    }

    /// <summary>Epoll thread: the socket is ready.</summary>
    internal void Dispatch(uint events)
    {
        Action<uint>? handler;
        lock (_gate)
        {
            if (_removed)
            {
                return;
            }

            handler = _handler;
        }

        if (handler is not null)
        {
            handler(events);
        }
        else
        {
            Complete(events, null);
        }
    }

    private void Complete(uint events, Exception? error)
    {
        lock (_gate)
        {
            if (!_waiting)
            {
                return;
            }

            _waiting = false;
        }

        if (error is null)
        {
            _core.SetResult(events);
        }
        else
        {
            _core.SetException(error);
        }
    }

    /// <summary>Takes the socket out of epoll (before it is closed) and drops the handle reference; a pending wait fails.</summary>
    public void Remove()
    {
        lock (_gate)
        {
            if (_removed)
            {
                return;
            }

            _removed = true;
            if (_added)
            {
                _reactor.Control(LinuxNative.EPOLL_CTL_DEL, (int)_socket.DangerousGetHandle(), 0, _token);
            }
        }

        _reactor.Forget(_token);
        Complete(0, new ObjectDisposedException(nameof(SocketRegistration)));
        if (_referenced)
        {
            _referenced = false;
            _socket.DangerousRelease();
        }
    }

    uint IValueTaskSource<uint>.GetResult(short token)
    {
        _cancellation.Dispose();
        _cancellation = default;
        return _core.GetResult(token);
    }

    ValueTaskSourceStatus IValueTaskSource<uint>.GetStatus(short token) => _core.GetStatus(token);

    void IValueTaskSource<uint>.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);
}
