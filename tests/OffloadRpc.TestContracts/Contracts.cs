using MessagePack;

namespace OffloadRpc.TestContracts;

public enum Channel
{
    Red,
    Green,
    Blue,
}

[MessagePackObject]
public sealed class DetectOptions
{
    [Key(0)]
    public float Threshold { get; set; }

    [Key(1)]
    public string? Label { get; set; }

    [Key(2)]
    public List<int> Classes { get; set; } = [];
}

[MessagePackObject]
public sealed class Detection
{
    [Key(0)]
    public int X { get; set; }

    [Key(1)]
    public int Y { get; set; }

    [Key(2)]
    public float Score { get; set; }

    [Key(3)]
    public string? Label { get; set; }
}

/// <summary>The service of the design notes, verbatim.</summary>
[OffloadService]
public interface IImageService
{
    ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default);

    ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default);

    ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default);

    ValueTask<Detection[]> DetectAsync(
        [Transfer(TransferMode.Pipelined, CachePolicy.Bypass)] ReadOnlyMemory<byte> batch,
        DetectOptions options,
        CancellationToken ct = default);

    ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default);

    ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default);
}

/// <summary>Every parameter and return kind the generator supports, one method each.</summary>
[OffloadService]
public interface IKitchenSink
{
    Task<string> ConcatAsync(string a, string? b);

    Task DoNothingAsync();

    ValueTask<Channel> NextChannelAsync(Channel channel);

    Task<List<string>> SplitAsync(string text, char separator);

    Task<double[]> ScaleAsync(double[] values, double factor);

    ValueTask<double> SumAsync(ReadOnlyMemory<float> floats, Memory<int> ints);

    ValueTask<long> TotalLengthAsync(ReadOnlyMemory<byte> first, byte[] second, SharedBuffer third, ReadOnlyMemory<byte> fourth);

    ValueTask<ReadOnlyMemory<byte>> ReverseAsync(ReadOnlyMemory<byte> data);

    Task<int[]?> MaybeAsync(int[]? values);

    Task<string[]> WordsAsync(string[] words, Dictionary<string, int> counts);

    Task<decimal> AddDecimalAsync(decimal a, decimal b);

    Task<DateTime> ShiftAsync(DateTime moment, TimeSpan by);

    Task<(int Count, string Text)> TupleAsync(int count, string text);

    Task SleepAsync(int milliseconds, CancellationToken cancellationToken);

    Task<int> CancellationsObservedAsync();

    Task FailAsync(string message);

    Task<string> WhoCalledAsync();

    Task<SharedBuffer?> MaybeLeaseAsync(int length);

    /// <summary>Reads the lease, then throws without disposing it (the runtime must give it back).</summary>
    Task<int> RejectAsync(SharedBuffer frame);

    /// <summary>Pipelined: the server starts reading before the client has finished copying. Returns checksum, length, first-read timestamp.</summary>
    ValueTask<long[]> ConsumeStreamAsync(Stream data, CancellationToken cancellationToken = default);

    ValueTask<long> CountBytesAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> chunks);

    /// <summary>
    /// Copies the Stream with CopyToAsync (<paramref name="useAsync"/>) or CopyTo into a sink that notes how
    /// each write came, never asking for its length. Returns checksum, length, writes, writes handed over in
    /// place (memory that is no array), and 1 when the stream's Length was known (0: it threw NotSupportedException).
    /// </summary>
    ValueTask<long[]> CopyStreamAsync(Stream data, bool useAsync, CancellationToken cancellationToken = default);

    /// <summary>Reads the first <paramref name="bytes"/> bytes of the Stream (fewer when it ends first) and returns how many, leaving the rest unread.</summary>
    ValueTask<long> ReadPrefixAsync(Stream data, int bytes, CancellationToken cancellationToken = default);

    /// <summary>Reads the Stream to its end, checking every byte against the test's block pattern. Returns bytes read, the first wrong position (-1: none), and the stream's Length (-1: unknown).</summary>
    ValueTask<long[]> VerifyPatternAsync(Stream data, CancellationToken cancellationToken = default);
}

[MessagePackObject]
public sealed class Tick
{
    [Key(0)]
    public int Index { get; set; }

    [Key(1)]
    public string? Label { get; set; }

    [Key(2)]
    public ulong Checksum { get; set; }
}

/// <summary>What a server-side producer did: items it produced, whether its token fired, whether it finished.</summary>
[MessagePackObject]
public sealed class ProducerStatus
{
    [Key(0)]
    public int Produced { get; set; }

    [Key(1)]
    public bool Cancelled { get; set; }

    [Key(2)]
    public bool Finished { get; set; }

    /// <summary>The server's resident memory (bytes) when asked.</summary>
    [Key(3)]
    public long ResidentBytes { get; set; }

    /// <summary>The exception a consumer on the server saw ("Type: message"), or null.</summary>
    [Key(4)]
    public string? Error { get; set; }
}

/// <summary>Streamed results: values, buffers in place and leases, with the producer observable through unary calls.</summary>
[OffloadService]
public interface IFrameSource
{
    /// <summary><paramref name="count"/> ticks, each labelled and carrying the checksum of its index.</summary>
    IAsyncEnumerable<Tick> TicksAsync(int count, string label, CancellationToken ct = default);

    /// <summary><paramref name="count"/> frames of <paramref name="size"/> bytes, frame i filled from seed <paramref name="seed"/> + i (Checksum64.Fill).</summary>
    IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync(int count, int size, int seed, CancellationToken ct = default);

    /// <summary>As <see cref="FramesAsync"/>, frames of ints (ReadOnlyMemory of an unmanaged T other than byte): int j of frame i is i * 1000 + j.</summary>
    IAsyncEnumerable<ReadOnlyMemory<int>> NumbersAsync(int count, int length, CancellationToken ct = default);

    /// <summary>Yields 0, 1, ... <paramref name="after"/> - 1, then throws InvalidOperationException("producer failed after N").</summary>
    IAsyncEnumerable<int> FailingAsync(int after, CancellationToken ct = default);

    /// <summary>Frames of <paramref name="size"/> bytes (frame i from seed i) until cancelled; progress is recorded under <paramref name="tag"/>.</summary>
    IAsyncEnumerable<ReadOnlyMemory<byte>> EndlessAsync(string tag, int size, CancellationToken ct = default);

    /// <summary>What the producer recorded under <paramref name="tag"/>.</summary>
    ValueTask<ProducerStatus> StatusAsync(string tag, CancellationToken ct = default);

    /// <summary><paramref name="count"/> leases of <paramref name="size"/> bytes rented from the calling connection, lease i filled from seed <paramref name="seed"/> + i: ownership moves to the consumer.</summary>
    IAsyncEnumerable<SharedBuffer> RenderAsync(int count, int size, int seed, CancellationToken ct = default);

    /// <summary>Client streaming: counts the ticks, checking each one's index and checksum (a wrong one fails the call).</summary>
    ValueTask<int> CountTicksAsync(IAsyncEnumerable<Tick> ticks, CancellationToken ct = default);

    /// <summary>Client streaming of leases: the checksums of every frame, combined in order (each lease is disposed by the server).</summary>
    ValueTask<ulong> ChecksumLeasesAsync(IAsyncEnumerable<SharedBuffer> frames, CancellationToken ct = default);

    /// <summary>Client streaming of leases: takes <paramref name="failAfter"/> of them without disposing any, then throws InvalidOperationException (the runtime must give them back).</summary>
    ValueTask<int> HoardLeasesAsync(IAsyncEnumerable<SharedBuffer> frames, int failAfter, CancellationToken ct = default);

    /// <summary>Duplex: yields the length of each lease it takes and keeps (never disposed), and throws InvalidOperationException after <paramref name="failAfter"/> of them.</summary>
    IAsyncEnumerable<int> HoardEachAsync(IAsyncEnumerable<SharedBuffer> frames, int failAfter, CancellationToken ct = default);

    /// <summary>Client streaming: takes the values slowly (<paramref name="delayMs"/> each), recording under <paramref name="tag"/> how many it took and what ended it.</summary>
    ValueTask<int> SlowDrainAsync(string tag, IAsyncEnumerable<int> values, int delayMs, CancellationToken ct = default);

    /// <summary>Duplex: for each frame that comes in, its checksum goes out.</summary>
    IAsyncEnumerable<ulong> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<int>> frames, CancellationToken ct = default);

    /// <summary>Duplex: for each tick that comes in, the length of its label goes out (-1 for none).</summary>
    IAsyncEnumerable<int> LabelLengthsAsync(IAsyncEnumerable<Tick> ticks, CancellationToken ct = default);

    /// <summary>Client streaming, sloppily: the checksum of the first frame's bytes, read with an enumerator the method never disposes (the runtime must give the frame back when the call ends).</summary>
    ValueTask<ulong> FirstChecksumAsync(IAsyncEnumerable<ReadOnlyMemory<int>> frames, CancellationToken ct = default);

    /// <summary>One frame as a plain array result: <paramref name="length"/> bytes filled from <paramref name="seed"/> (Checksum64.Fill).</summary>
    ValueTask<byte[]> FillAsync(int length, int seed, CancellationToken ct = default);
}

/// <summary>
/// A call with a buffer argument and a plain result, as the transport suite asks it: over gRPC such a
/// method is bound as client streaming and a call whose buffer fits the head frame goes as a unary call,
/// so headers, deadlines, cancellation and faults are checked on both paths.
/// </summary>
[OffloadService]
public interface IUploadProbe
{
    /// <summary>
    /// Waits on the call's token up to <paramref name="milliseconds"/>, then "checksum headers=name=value;..."
    /// of <paramref name="data"/>; records how the wait ended where <see cref="ICallProbe.LastOutcomeAsync"/> reads it.
    /// </summary>
    ValueTask<string> ChecksumAfterAsync(ReadOnlyMemory<byte> data, int milliseconds, CancellationToken ct = default);
}

/// <summary>
/// What the hosting, metadata, interceptor and telemetry tests ask a server: what it saw of a call
/// (headers, deadline, cancellation, trace context, which instance served it), and real work on bytes.
/// </summary>
[OffloadService]
public interface ICallProbe
{
    /// <summary>The request headers the server saw, as "name=value", sorted.</summary>
    ValueTask<string[]> HeadersAsync(CancellationToken ct = default);

    /// <summary>Waits on the call's token up to <paramref name="milliseconds"/>; records what happened (see <see cref="LastOutcomeAsync"/>).</summary>
    ValueTask<string> WaitForCancelAsync(int milliseconds, CancellationToken ct = default);

    /// <summary>What the last <see cref="WaitForCancelAsync"/> saw: "cancelled deadline=yes|no" or "completed", or "none".</summary>
    ValueTask<string> LastOutcomeAsync(CancellationToken ct = default);

    /// <summary>The server span as the server sees it: "traceId parentSpanId spanId" (or "none").</summary>
    ValueTask<string> TraceAsync(CancellationToken ct = default);

    /// <summary>The serving implementation's instance number and its scoped dependency's: "instance dependency".</summary>
    ValueTask<string> InstanceAsync(CancellationToken ct = default);

    /// <summary>A checksum of the bytes (real work on a shared-memory payload).</summary>
    ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default);

    /// <summary>Lines the server's interceptor and listeners recorded, newest last.</summary>
    ValueTask<string[]> ServerLogAsync(CancellationToken ct = default);

    /// <summary>A method without a result.</summary>
    ValueTask PingAsync(CancellationToken ct = default);

    /// <summary>
    /// Server streaming: <paramref name="count"/> items "i headers=name=value;... deadline=yes|no trace=traceId parentSpanId",
    /// <paramref name="delayMs"/> apart, as the method saw its call; records how it ended (see <see cref="LastOutcomeAsync"/>).
    /// </summary>
    IAsyncEnumerable<string> WatchAsync(int count, int delayMs, CancellationToken ct = default);

    /// <summary>Duplex: for each chunk that comes in (an item each), "checksum headers=..." of its bytes.</summary>
    IAsyncEnumerable<string> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default);

    /// <summary>Client streaming: "checksum headers=..." of all chunks together.</summary>
    ValueTask<string> ChecksumAllAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default);
}
