using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>
/// One end of a connection: the message-level API the generated proxies and stubs call.
/// <para>
/// Per direction there is a control area (message ring + release ring, created by the sender) and a
/// payload arena (segments created by the sender). Any number of threads send; the process's poller
/// (<see cref="Poller"/>, one thread for many connections) consumes the inbound ring, completes calls
/// and runs request handlers; the process's <see cref="SocketReactor"/> (one epoll thread for every
/// socket) maps segments the peer hands over and notices the peer's death (end of stream).
/// </para>
/// </summary>
internal sealed partial class RpcConnection : IArenaPeer, ILeaseHost, IAsyncDisposable
{
    private readonly SocketChannel _channel;
    private readonly TransportOptions _options;

    /// <summary>How long a pipelined payload may make no progress before its sender counts as stuck.</summary>
    internal TimeSpan StallTimeout => _options.ArenaWaitTimeout;

    /// <summary>The spin budget of readers waiting for a pipelined payload's next chunk.</summary>
    internal AdaptiveSpin PipelineSpin { get; }
    private readonly ControlArea _outbound;
    private readonly ControlArea _inbound;
    private readonly PayloadArena _arena;
    private readonly SharedMemorySegment?[] _peerSegments = new SharedMemorySegment?[PayloadArena.MaxSegments + 1];
    private readonly PendingCallTable _calls;
    private readonly IRequestHandler? _handler;
    private readonly IncomingCall?[] _servedCalls;
    private readonly ConcurrentQueue<IncomingCall> _incomingPool = new();
    private readonly ConcurrentQueue<ulong> _overflowReleases = new();
    private int _overflowCount;
    private readonly ConcurrentQueue<ControlMessage> _pendingCancels = new();
    private readonly object _cancelFlushLock = new();
    private readonly SpinPolicy _spin;
    private readonly AdaptiveSpin _sendSpin;
    private readonly AdaptiveSpin _arenaSpin;
    private readonly InboundSource _receiver;
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _partsRunning = 2; // the receiver and the socket loop; the last to stop gives the memory back
    private readonly object _announceLock = new();
    private readonly Action<PayloadArena> _drainReleases;
    private IncomingCall? _spareIncomingCall;
    private long _announcesSent;
    private long _announcesAcknowledged;
    private Exception? _terminal;
    private int _closed;
    private int _started;

    internal RpcConnection(SocketChannel channel, TransportOptions options, ControlArea outbound, ControlArea inbound, PeerInfo peer, IRequestHandler? handler, string role)
    {
        _channel = channel;
        _options = options;
        _outbound = outbound;
        _inbound = inbound;
        Peer = peer;
        _handler = handler;
        Role = role;
        Geometry = outbound.Geometry;
        _sendSpin = new AdaptiveSpin(options.SpinBudget);
        _arenaSpin = new AdaptiveSpin(options.SpinBudget);
        PipelineSpin = new AdaptiveSpin(options.SpinBudget);
        _arena = new PayloadArena(this, options.SegmentSize, options.MaxArenaBytes, options.ArenaWaitTimeout, $"{role}-{Environment.ProcessId}");
        _calls = new PendingCallTable(this, Geometry.SlotCount, options.RunContinuationsAsynchronously, options.SpinBudget);
        _spin = new SpinPolicy(options.SpinBudget);
        _servedCalls = new IncomingCall?[Geometry.SlotCount];
        _drainReleases = DrainReleases;
        _receiver = new InboundSource(this);
    }

    /// <summary>"client" or "server"; used in thread and segment names.</summary>
    public string Role { get; }

    public PeerInfo Peer { get; }

    /// <summary>The services the peer declared at the handshake (name to contract hash): served ones for a client, compiled-in ones for a server.</summary>
    public IReadOnlyDictionary<string, ulong> PeerContracts { get; init; } = new Dictionary<string, ulong>();

    public RingGeometry Geometry { get; }

    /// <summary>The arena this side writes its outgoing payloads into.</summary>
    public PayloadArena Arena => _arena;

    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    /// <summary>Why the connection closed; null while it is open.</summary>
    public Exception? TerminalException => Volatile.Read(ref _terminal);

    /// <summary>Completes when the receiver and the socket loop have stopped and the connection's memory is given back.</summary>
    public Task Completion => _completion.Task;

    /// <summary>Raised once, from a connection thread, after the connection closed.</summary>
    public event Action<RpcConnection, Exception>? Closed;

    /// <summary>The connections of this process that started and have not given their memory back (for the telemetry gauges).</summary>
    internal static ICollection<RpcConnection> Live => s_live.Keys;

    private static readonly ConcurrentDictionary<RpcConnection, byte> s_live = new();

    internal void Start()
    {
        if (Volatile.Read(ref _started) == 0)
        {
            SocketRegistration socket = _channel.Registration; // may throw (socket disposed by a cancelled connect): then nothing started
            socket.SetHandler(OnSocketReady);
            Volatile.Write(ref _started, 1);
            // Neither the reactor's thread nor the poller's captured the starting code's ExecutionContext
            // (an OffloadCallContext of a call that connected onward would otherwise live on in them).
            socket.Arm();
            PollerGroup.Add(_receiver);
            s_live[this] = 0;
        }
    }

    /// <summary>
    /// Test hook: the connection counts as started, but its receiver (<see cref="PollInbound"/>) and socket
    /// frames (<see cref="HandleFrame"/>) are driven by the caller (the fuzzer), who reports both stopped with
    /// <see cref="StopDrivenForTests"/>; until then a close keeps the memory mapped, as for a running connection.
    /// </summary>
    internal void StartDrivenForTests() => Volatile.Write(ref _started, 1);

    /// <summary>Test hook: the caller's receiver and socket loop have stopped (see <see cref="StartDrivenForTests"/>).</summary>
    internal void StopDrivenForTests()
    {
        PartStopped();
        PartStopped();
    }

    // ------------------------------------------------------------------ closing

    public void ThrowIfClosed()
    {
        if (IsClosed)
        {
            throw ClosedException();
        }
    }

    internal Exception ClosedException() => Volatile.Read(ref _terminal) switch
    {
        PeerDisconnectedException e => new PeerDisconnectedException(e.Message, e),
        ProtocolViolationException e => new ProtocolViolationException(e.Message, e),
        ObjectDisposedException => new ObjectDisposedException(nameof(RpcConnection), "The connection was disposed."),
        { } e => new PeerDisconnectedException("The connection is closed: " + e.Message, e),
        null => new PeerDisconnectedException("The connection is closed."),
    };

    /// <summary>Closes the connection for <paramref name="reason"/> (first reason wins) and wakes every waiter.</summary>
    internal unsafe void Terminate(Exception reason)
    {
        if (Interlocked.CompareExchange(ref _terminal, reason, null) is not null)
        {
            return;
        }

        Interlocked.Exchange(ref _closed, 1);

        // Served calls learn at once that nobody waits for their answers (a method running inline on the
        // poller would otherwise see its token fire only after it returned). Their tokens' callbacks are
        // user code: run them on the thread pool, not on the thread that noticed the death.
        ThreadPool.UnsafeQueueUserWorkItem(static connection => connection.CancelServedCalls(), this, preferLocal: false);
        // The receive thread may release the areas as soon as it sees the connection closed: a wake
        // word is touched only under a reference, and not at all once the areas are gone.
        if (_inbound.Segment.TryAddReference())
        {
            SharedWait.WakeUnconditionally(_inbound.ConsumerWake);
            SharedWait.WakeUnconditionally(_inbound.ReleaseConsumerWake);
            _inbound.Segment.Release();
        }

        if (_outbound.Segment.TryAddReference())
        {
            SharedWait.WakeUnconditionally(_outbound.MessageProducerWake);
            _outbound.Segment.Release();
        }

        lock (_announceLock)
        {
            Monitor.PulseAll(_announceLock);
        }

        _channel.Shutdown();
        if (Volatile.Read(ref _started) == 0)
        {
            // Never started: nothing else will release the resources.
            ReleaseResources(reason);
            _completion.TrySetResult();
        }
    }

    /// <summary>
    /// Closes the connection and completes once its receiver and socket loop have stopped and its
    /// memory is given back. Safe to await from a continuation running on the poller: awaiting yields
    /// the thread, which then drops the connection and completes the wait.
    /// </summary>
    public ValueTask DisposeAsync()
    {
        Terminate(new ObjectDisposedException(nameof(RpcConnection)));
        return ConnectionAsync.DisposeAfterAsync(Completion, _channel);
    }

    /// <summary>The receiver or the socket loop has stopped; the last of the two gives the connection's memory back.</summary>
    private void PartStopped()
    {
        int running = Interlocked.Decrement(ref _partsRunning);
        Debug.Assert(running >= 0, "a connection part stopped twice");
        if (running == 0)
        {
            ReleaseResources(TerminalException!);
            _completion.TrySetResult();
        }
    }

    private void CancelServedCalls()
    {
        for (int i = 0; i < _servedCalls.Length; i++)
        {
            Volatile.Read(ref _servedCalls[i])?.Cancel(null);
        }
    }

    private void ReleaseResources(Exception reason)
    {
        _calls.FailAll(ClosedException());
        CancelServedCalls();

        // The connection's (owner's) references: leases and payloads still held keep their mappings.
        Debug.Assert(Volatile.Read(ref _started) == 0 || Volatile.Read(ref _partsRunning) == 0, "neither the socket loop nor the receiver touches a segment after the resources are released");
        _arena.Close();
        for (int i = 0; i < _peerSegments.Length; i++)
        {
            if (Interlocked.Exchange(ref _peerSegments[i], null) is { } segment)
            {
                ForgetPeerSegment(segment);
                segment.Dispose();
            }
        }

        _inbound.Dispose();
        _outbound.Dispose();
        s_live.TryRemove(this, out _);
        LogClose(reason);
        try
        {
            Closed?.Invoke(this, reason);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            Trace.TraceError($"OffloadRpc: a Closed handler threw: {ex}");
        }
    }


    private void LogClose(Exception reason)
    {
        Microsoft.Extensions.Logging.ILogger logger = _options.Logger;
        switch (reason)
        {
            case ProtocolViolationException violation:
                Diagnostics.Log.ProtocolViolation(logger, Role, Peer.ProcessId, violation.Message, violation);
                break;
            case PeerDisconnectedException:
                Diagnostics.Log.PeerDisconnected(logger, Peer.ProcessId, Role, reason.Message);
                break;
            default:
                Diagnostics.Log.ConnectionClosed(logger, Role, Peer.ProcessId, reason.Message);
                break;
        }
    }

    public override string ToString() => $"RpcConnection({Role}, peer pid {Peer.ProcessId}, {(IsClosed ? "closed" : "open")})";
}

/// <summary>Who is on the other end, from SO_PEERCRED.</summary>
internal readonly record struct PeerInfo(int ProcessId, uint UserId, uint GroupId);
