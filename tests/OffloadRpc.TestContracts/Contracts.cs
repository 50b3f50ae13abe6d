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
}
