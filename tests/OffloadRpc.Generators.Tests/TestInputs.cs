namespace OffloadRpc.Generators.Tests;

/// <summary>Contract sources the tests feed to the generator. Compiled without implicit usings, so every using is spelled out.</summary>
internal static class TestInputs
{
    /// <summary>The service of the design notes, with its six methods, SharedBuffer both ways and a [Transfer] parameter.</summary>
    public const string DesignExample = """
        using System;
        using System.Collections.Generic;
        using System.Threading;
        using System.Threading.Tasks;
        using MessagePack;
        using OffloadRpc;

        namespace Sample.Imaging;

        [MessagePackObject]
        public sealed class DetectOptions
        {
            [Key(0)]
            public float Threshold { get; set; }

            [Key(1)]
            public string? Label { get; set; }

            [Key(2)]
            public List<int> Classes { get; set; } = new();
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
        """;

    /// <summary>Every kind of value: primitives, enums, strings (nullable too), MessagePack types, buffers, leases, void results, escaped names.</summary>
    public const string KitchenSink = """
        using System;
        using System.Collections.Generic;
        using System.Threading;
        using System.Threading.Tasks;
        using MessagePack;
        using OffloadRpc;

        namespace Sample.Sink;

        public enum Channel
        {
            Red,
            Green,
            Blue,
        }

        public enum Level : byte
        {
            Low = 1,
            High = 200,
        }

        [MessagePackObject]
        public sealed class Point
        {
            [Key(0)]
            public int X { get; set; }

            [Key(1)]
            public int Y { get; set; }
        }

        [OffloadService]
        public interface IKitchenSink
        {
            Task<string> ConcatAsync(string a, string? b);

            ValueTask<long> ConsumeAsync(System.IO.Stream data, [Transfer(TransferMode.Pipelined, CachePolicy.Bypass)] IAsyncEnumerable<ReadOnlyMemory<byte>> chunks, CancellationToken cancellationToken = default);

            Task<string?> FindAsync(string key);

            Task DoNothingAsync();

            ValueTask ResetAsync(CancellationToken cancellationToken);

            ValueTask<Channel> NextChannelAsync(Channel channel, Level level);

            Task<List<string>> SplitAsync(string text, char separator);

            Task<Point?> MoveAsync(Point point, Point? origin, Dictionary<string, int> counts);

            Task<double[]> ScaleAsync(double[] values, double factor);

            Task<int[]?> MaybeAsync(int[]? values);

            ValueTask<double> SumAsync(ReadOnlyMemory<float> floats, Memory<int> ints);

            ValueTask<ReadOnlyMemory<byte>> ReverseAsync(ReadOnlyMemory<byte> data);

            ValueTask<Memory<short>> ShortsAsync(int count);

            ValueTask<long> TotalLengthAsync(byte[] first, SharedBuffer? second);

            Task<SharedBuffer?> MaybeLeaseAsync(int length);

            Task<int?> ParseAsync(string text, bool strict, long? fallback);

            Task<(int Count, string Text)> TupleAsync(int count, string text);

            Task<decimal> AddDecimalAsync(decimal a, decimal b);

            Task<DateTime> ShiftAsync(DateTime moment, TimeSpan by);

            ValueTask<bool> @checked(int @class, string @event, int @await, CancellationToken @default);
        }
        """;

    /// <summary>An internal interface in the global namespace: its proxy and stub land in OffloadRpc.Generated.</summary>
    public const string GlobalNamespace = """
        using System.Threading;
        using System.Threading.Tasks;

        [OffloadRpc.OffloadService]
        internal interface IGlobalCalculator
        {
            Task<int> AddAsync(int a, int b);

            ValueTask ClearAsync(CancellationToken cancellationToken = default);

            ValueTask<float[]> HistoryAsync();
        }
        """;

    /// <summary>Streamed results of each item kind (MessagePack, primitives, buffers lent in place, leases), a streamed argument, and duplex.</summary>
    public const string Streams = """
        using System;
        using System.Collections.Generic;
        using System.Threading;
        using System.Threading.Tasks;
        using MessagePack;
        using OffloadRpc;

        namespace Sample.Streams;

        [MessagePackObject]
        public sealed class Detection
        {
            [Key(0)] public int X { get; set; }
        }

        [OffloadService]
        public interface ICamera
        {
            IAsyncEnumerable<Detection> WatchAsync(string query, CancellationToken ct = default);

            IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync(int count);

            IAsyncEnumerable<ReadOnlyMemory<float>> TensorsAsync(int count, CancellationToken ct = default);

            IAsyncEnumerable<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default);

            IAsyncEnumerable<int> CountAsync(int to);

            ValueTask<long> UploadAsync(IAsyncEnumerable<Detection> detections, CancellationToken ct = default);

            IAsyncEnumerable<ReadOnlyMemory<byte>> TransformAsync(IAsyncEnumerable<SharedBuffer> frames, int quality, CancellationToken ct = default);
        }
        """;

    /// <summary>The golden cases, by name: the name is the folder under Golden/.</summary>
    public static readonly IReadOnlyDictionary<string, string> GoldenCases = new Dictionary<string, string>
    {
        ["DesignExample"] = DesignExample,
        ["KitchenSink"] = KitchenSink,
        ["GlobalNamespace"] = GlobalNamespace,
        ["Streams"] = Streams,
    };
}
