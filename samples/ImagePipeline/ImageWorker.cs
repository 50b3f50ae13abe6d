using OffloadRpc;

namespace ImagePipeline;

/// <summary>The worker process's implementation: runs the fast kernels on memory that lives in shared memory.</summary>
internal sealed class ImageWorker : IImageWorker
{
    /// <summary><paramref name="rgbFrame"/> points into shared memory and is valid until this method returns.</summary>
    public ValueTask<HistogramResult> HistogramAsync(ReadOnlyMemory<byte> rgbFrame, int width, int height, CancellationToken ct = default) =>
        ValueTask.FromResult(Kernels.Histogram(rgbFrame.Span, width, height));

    public ValueTask<ChannelStats> NormalizeStatsAsync(ReadOnlyMemory<float> batch, int images, int channels, int height, int width, CancellationToken ct = default) =>
        ValueTask.FromResult(Kernels.NormalizeStats(batch.Span, images, channels, height, width));

    /// <summary>The frame is ours now (dispose gives it back); the thumbnail is rented from the calling connection and returned without a copy.</summary>
    public ValueTask<SharedBuffer> ThumbnailAsync(SharedBuffer rgbFrame, int width, int height, CancellationToken ct = default)
    {
        using (rgbFrame)
        {
            Kernels.CheckFrame(rgbFrame.Length, width, height); // before renting: a bad call costs no shared memory
            Kernels.CheckThumbnail(Kernels.ThumbnailBytes(width, height), width, height);
            SharedBuffer thumbnail = OffloadCallContext.Current!.Rent(Kernels.ThumbnailBytes(width, height));
            try
            {
                Kernels.Thumbnail(rgbFrame.Span, width, height, thumbnail.Span);
            }
            catch
            {
                thumbnail.Dispose();
                throw;
            }

            return ValueTask.FromResult(thumbnail);
        }
    }

    public ValueTask<int> PingAsync(int value) => ValueTask.FromResult(value + 1);
}
