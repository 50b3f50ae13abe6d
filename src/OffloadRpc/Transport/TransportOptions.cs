namespace OffloadRpc.Transport;

/// <summary>Knobs of the shared-memory transport. The defaults suit a 2-core machine and payloads up to hundreds of MiB.</summary>
internal sealed class TransportOptions
{
    /// <summary>Size of a control-ring slot; small messages travel inline in it.</summary>
    public int SlotSize { get; init; } = 512;

    /// <summary>Slots per direction; also the most calls one connection has in flight.</summary>
    public int SlotCount { get; init; } = 256;

    /// <summary>Entries of the ring on which the receiver of payloads hands blocks back.</summary>
    public int ReleaseSlotCount { get; init; } = 4096;

    /// <summary>How long a waiting thread spins before it sleeps on a futex (the budget adapts below this). Zero: never spin.</summary>
    public TimeSpan SpinBudget { get; init; } = TimeSpan.FromMicroseconds(200);

    /// <summary>Size of an ordinary payload-arena segment; larger payloads get a segment of their own size.</summary>
    public long SegmentSize { get; init; } = 64L << 20;

    /// <summary>The most shared memory one direction's arena may hold.</summary>
    public long MaxArenaBytes { get; init; } = 2L << 30;

    /// <summary>The largest segment a peer may announce; a larger one is a protocol violation.</summary>
    public long MaxPeerSegmentBytes { get; init; } = 4L << 30;

    /// <summary>The largest control area (both rings) a client may ask this server for.</summary>
    public long MaxPeerControlAreaBytes { get; init; } = 16L << 20;

    /// <summary>The most shared memory (all its segments) one peer may have this process map.</summary>
    public long MaxPeerMappedBytes { get; init; } = 8L << 30;

    /// <summary>The most segments one peer may have this process map (each is a mapping; the kernel caps mappings per process).</summary>
    public int MaxPeerSegments { get; init; } = 256;

    /// <summary>The most shared memory peers may have this process map in all (the process's own segments not counted).</summary>
    public long MaxMappedBytes { get; init; } = 256L << 30;

    /// <summary>Server: the most connections open at once; more are refused at the handshake.</summary>
    public int MaxConnections { get; init; } = 1024;

    /// <summary>Server: the most handshakes in progress at once; a socket accepted beyond it is closed at once.</summary>
    public int MaxConcurrentHandshakes { get; init; } = 64;

    /// <summary>Releases this side may queue while the peer's release ring is full (the peer is not draining it); more is a protocol violation.</summary>
    public int MaxPendingReleases { get; init; } = 1 << 16;

    /// <summary>The largest message body (the MessagePack part of a request or reply) accepted from the peer.</summary>
    public int MaxMessageBytes { get; init; } = 16 << 20;

    /// <summary>The most items of one stream this side consumes that may be in flight (its producer waits for credit beyond).</summary>
    public int StreamWindow { get; init; } = 16;

    /// <summary>The chunk size of a pipelined payload: the receiver can start once the first chunk has landed.</summary>
    public long PipelineChunkBytes { get; init; } = Engines.TransferPolicy.PipelineChunkBytes;

    /// <summary>How long a send waits for arena space before it fails with <see cref="ArenaExhaustedException"/>.</summary>
    public TimeSpan ArenaWaitTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>How long connecting, the handshake and a segment hand-over may take.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>User ids besides this process's own that may connect (server) or serve (client).</summary>
    public IReadOnlyCollection<uint> AllowedUserIds { get; init; } = [];

    /// <summary>
    /// Run await continuations of calls on the thread pool instead of inline on the receiver.
    /// Inline is faster; turn this on if continuations block synchronously on other calls.
    /// </summary>
    public bool RunContinuationsAsynchronously { get; init; }

    /// <summary>
    /// Run request handlers on the thread pool instead of inline on the receiver. Inline is
    /// fastest (no hand-off) but a handler that computes synchronously holds up its connection's other
    /// calls and their cancels until it returns or awaits.
    /// </summary>
    public bool DispatchToThreadPool { get; init; }

    /// <summary>
    /// The longest single futex sleep of this connection's waiters before they re-check their condition
    /// (a safety net: closing and cancelling wake them explicitly); -1: sleep until woken. The lost-wake-up
    /// tests use -1, so that a lost wake-up hangs instead of being hidden by the re-check.
    /// </summary>
    internal int SleepSliceMilliseconds { get; init; } = SharedWait.DefaultSleepSliceMilliseconds;

    /// <summary>For tests: the protocol version this side claims in the handshake.</summary>
    internal int ProtocolVersion { get; init; } = TransportProtocol.Version;

    internal RingGeometry Geometry => new(SlotSize, SlotCount, ReleaseSlotCount);

    public static TransportOptions Default { get; } = new();

    /// <summary>Where connections log accepted and refused peers, protocol violations and peer death.</summary>
    public Microsoft.Extensions.Logging.ILogger Logger { get; init; } = Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;
}

/// <summary>A service contract the client expects: its name and the hash of its shape.</summary>
internal readonly record struct ContractDescriptor(string Name, ulong Hash);
