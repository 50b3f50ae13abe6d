using MessagePack;
using OffloadRpc;

namespace ImagePipeline;

/// <summary>
/// The worker process's service. Every method does real work on every byte it is given; the large
/// inputs travel through shared memory (buffers are copied once, a <see cref="SharedBuffer"/> not at all).
/// </summary>
[OffloadService]
public interface IImageWorker
{
    /// <summary>Per-channel 256-bin histograms and the mean luminance of an interleaved RGB frame.</summary>
    ValueTask<HistogramResult> HistogramAsync(ReadOnlyMemory<byte> rgbFrame, int width, int height, CancellationToken ct = default);

    /// <summary>Per-channel mean and standard deviation of a batch laid out NCHW (images x channels x height x width).</summary>
    ValueTask<ChannelStats> NormalizeStatsAsync(ReadOnlyMemory<float> batch, int images, int channels, int height, int width, CancellationToken ct = default);

    /// <summary>An 8x box-filtered thumbnail of an RGB frame: the frame moves in without a copy and the thumbnail moves back the same way.</summary>
    ValueTask<SharedBuffer> ThumbnailAsync(SharedBuffer rgbFrame, int width, int height, CancellationToken ct = default);

    /// <summary>
    /// Renders <paramref name="count"/> frames, from frame index <paramref name="firstFrame"/> on, each into shared memory,
    /// and streams them back as they are done: the client owns each frame (a lease) and consumes it while the next is
    /// rendered; at most <c>OffloadRpcOptions.StreamWindow</c> frames are in flight.
    /// </summary>
    IAsyncEnumerable<SharedBuffer> RenderStreamAsync(int count, int width, int height, int firstFrame, CancellationToken ct = default);

    /// <summary>Returns <paramref name="value"/> + 1: the round trip of a call that carries no payload.</summary>
    ValueTask<int> PingAsync(int value);
}

/// <summary>The histograms of an RGB frame (256 bins per channel) and its mean Rec. 601 luminance (0-255).</summary>
[MessagePackObject]
public sealed class HistogramResult
{
    [Key(0)]
    public int[] Red { get; set; } = [];

    [Key(1)]
    public int[] Green { get; set; } = [];

    [Key(2)]
    public int[] Blue { get; set; } = [];

    [Key(3)]
    public double MeanLuminance { get; set; }

    [Key(4)]
    public long Pixels { get; set; }
}

/// <summary>Per-channel statistics of a batch of images, as used to normalize a training set.</summary>
[MessagePackObject]
public sealed class ChannelStats
{
    [Key(0)]
    public double[] Mean { get; set; } = [];

    [Key(1)]
    public double[] Std { get; set; } = [];

    /// <summary>How many values each channel's statistics cover (images x height x width).</summary>
    [Key(2)]
    public long ValuesPerChannel { get; set; }
}
