using System.Buffers;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ImagePipeline;

/// <summary>
/// The image work, twice: the fast kernels the worker runs, and plain reference versions the client
/// checks them against. Luminance uses integer Rec. 601 weights (299, 587, 114 per mille), so the
/// mean luminance of the two versions is the same double, bit for bit.
/// </summary>
internal static class Kernels
{
    public const int ThumbnailScale = 8;

    // ---- input generation (deterministic, about memcpy speed) ----

    /// <summary>
    /// Renders frame <paramref name="frameIndex"/> into <paramref name="rgb"/>: a per-channel horizontal
    /// gradient with xorshift noise (one row template per frame) plus a vertical ramp that moves with the
    /// frame index. Each row is one vector add of the template, so rendering costs about a memcpy.
    /// </summary>
    public static void Render(Span<byte> rgb, int width, int height, int frameIndex)
    {
        int stride = checked(width * 3);
        CheckFrame(rgb.Length, width, height);
        byte[] rented = ArrayPool<byte>.Shared.Rent(stride);
        try
        {
            Span<byte> template = rented.AsSpan(0, stride);
            ulong state = 0x9E3779B97F4A7C15UL ^ (ulong)(uint)frameIndex * 0xD1B54A32D192ED03UL;
            for (int x = 0; x < width; x++)
            {
                int ramp = x * 256 / width;
                ulong noise = XorShift(ref state);
                template[x * 3] = (byte)(ramp + (int)(noise & 31));
                template[x * 3 + 1] = (byte)(255 - ramp + (int)((noise >> 8) & 63));
                template[x * 3 + 2] = (byte)((ramp * 2) + (int)((noise >> 16) & 15));
            }

            int vectorEnd = stride - (stride % Vector<byte>.Count);
            for (int y = 0; y < height; y++)
            {
                byte offset = (byte)((y * 160 / height) + (frameIndex * 3));
                var add = new Vector<byte>(offset);
                Span<byte> row = rgb.Slice(y * stride, stride);
                int i = 0;
                for (; i < vectorEnd; i += Vector<byte>.Count)
                {
                    (new Vector<byte>(template[i..]) + add).CopyTo(row[i..]);
                }

                for (; i < stride; i++)
                {
                    row[i] = (byte)(template[i] + offset);
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// Fills an NCHW batch with values in [0, 1) scaled and shifted per channel (so each channel has its
    /// own mean and spread), two values per xorshift step.
    /// </summary>
    public static void FillBatch(Span<float> batch, int images, int channels, int height, int width, ulong seed)
    {
        int plane = checked(height * width);
        if (batch.Length != checked(images * channels * plane))
        {
            throw new ArgumentException($"The batch holds {batch.Length} values, not {images}x{channels}x{height}x{width}.", nameof(batch));
        }

        ulong state = seed | 1;
        const float unit = 1f / (1 << 24);
        for (int image = 0; image < images; image++)
        {
            for (int channel = 0; channel < channels; channel++)
            {
                float scale = 0.5f + (0.2f * channel);
                float shift = 0.1f * channel;
                Span<float> values = batch.Slice(((image * channels) + channel) * plane, plane);
                int i = 0;
                for (; i + 1 < values.Length; i += 2)
                {
                    ulong r = XorShift(ref state);
                    values[i] = ((r & 0xFFFFFF) * unit * scale) + shift;
                    values[i + 1] = (((r >> 32) & 0xFFFFFF) * unit * scale) + shift;
                }

                if (i < values.Length)
                {
                    values[i] = ((XorShift(ref state) & 0xFFFFFF) * unit * scale) + shift;
                }
            }
        }
    }

    // ---- fast kernels (the worker) ----

    /// <summary>Histograms of every pixel, with two interleaved tables per channel so that equal neighbours do not serialize on one counter.</summary>
    public static HistogramResult Histogram(ReadOnlySpan<byte> rgb, int width, int height)
    {
        long pixels = CheckFrame(rgb.Length, width, height);
        int[] tables = new int[6 * 256]; // r0 g0 b0 r1 g1 b1
        ref int t = ref MemoryMarshal.GetArrayDataReference(tables);
        ref byte p = ref MemoryMarshal.GetReference(rgb);
        nint end = (nint)(pixels & ~1L) * 3;
        for (nint o = 0; o < end; o += 6)
        {
            Unsafe.Add(ref t, Unsafe.Add(ref p, o))++;
            Unsafe.Add(ref t, 256 + Unsafe.Add(ref p, o + 1))++;
            Unsafe.Add(ref t, 512 + Unsafe.Add(ref p, o + 2))++;
            Unsafe.Add(ref t, 768 + Unsafe.Add(ref p, o + 3))++;
            Unsafe.Add(ref t, 1024 + Unsafe.Add(ref p, o + 4))++;
            Unsafe.Add(ref t, 1280 + Unsafe.Add(ref p, o + 5))++;
        }

        if ((pixels & 1) != 0)
        {
            Unsafe.Add(ref t, Unsafe.Add(ref p, end))++;
            Unsafe.Add(ref t, 256 + Unsafe.Add(ref p, end + 1))++;
            Unsafe.Add(ref t, 512 + Unsafe.Add(ref p, end + 2))++;
        }

        var result = new HistogramResult { Red = new int[256], Green = new int[256], Blue = new int[256], Pixels = pixels };
        long sumR = 0, sumG = 0, sumB = 0;
        for (int bin = 0; bin < 256; bin++)
        {
            result.Red[bin] = tables[bin] + tables[768 + bin];
            result.Green[bin] = tables[256 + bin] + tables[1024 + bin];
            result.Blue[bin] = tables[512 + bin] + tables[1280 + bin];
            sumR += (long)bin * result.Red[bin];
            sumG += (long)bin * result.Green[bin];
            sumB += (long)bin * result.Blue[bin];
        }

        result.MeanLuminance = MeanLuminance((299 * sumR) + (587 * sumG) + (114 * sumB), pixels);
        return result;
    }

    /// <summary>Sums and sums of squares per plane in float vectors (a plane is short enough), per channel in double.</summary>
    public static ChannelStats NormalizeStats(ReadOnlySpan<float> batch, int images, int channels, int height, int width)
    {
        int plane = CheckBatch(batch.Length, images, channels, height, width);
        double[] sum = new double[channels];
        double[] squares = new double[channels];
        for (int image = 0; image < images; image++)
        {
            for (int channel = 0; channel < channels; channel++)
            {
                ReadOnlySpan<float> values = batch.Slice(((image * channels) + channel) * plane, plane);
                ReadOnlySpan<Vector<float>> vectors = MemoryMarshal.Cast<float, Vector<float>>(values);
                Vector<float> s0 = Vector<float>.Zero, s1 = Vector<float>.Zero, q0 = Vector<float>.Zero, q1 = Vector<float>.Zero;
                int v = 0;
                for (; v + 1 < vectors.Length; v += 2)
                {
                    Vector<float> a = vectors[v];
                    Vector<float> b = vectors[v + 1];
                    s0 += a;
                    q0 += a * a;
                    s1 += b;
                    q1 += b * b;
                }

                if (v < vectors.Length)
                {
                    s0 += vectors[v];
                    q0 += vectors[v] * vectors[v];
                }

                double s = Vector.Sum(s0 + s1);
                double q = Vector.Sum(q0 + q1);
                for (int i = vectors.Length * Vector<float>.Count; i < values.Length; i++)
                {
                    s += values[i];
                    q += (double)values[i] * values[i];
                }

                sum[channel] += s;
                squares[channel] += q;
            }
        }

        return Stats(sum, squares, (long)images * plane);
    }

    /// <summary>
    /// 8x8 box filter (rounded mean): each band of 8 rows is summed column-wise into 16-bit lanes with
    /// widening vector adds, then every 8 pixels of the band are summed per channel.
    /// </summary>
    public static void Thumbnail(ReadOnlySpan<byte> rgb, int width, int height, Span<byte> thumbnail)
    {
        CheckFrame(rgb.Length, width, height);
        CheckThumbnail(thumbnail.Length, width, height);
        int stride = width * 3;
        int outWidth = width / ThumbnailScale;
        int outStride = outWidth * 3;
        ushort[] rented = ArrayPool<ushort>.Shared.Rent(stride);
        try
        {
            Span<ushort> columns = rented.AsSpan(0, stride);
            int lanes = Vector<byte>.Count;
            int vectorEnd = stride - (stride % lanes);
            for (int band = 0; band < height / ThumbnailScale; band++)
            {
                columns.Clear();
                Span<Vector<ushort>> wide = MemoryMarshal.Cast<ushort, Vector<ushort>>(columns[..vectorEnd]);
                for (int r = 0; r < ThumbnailScale; r++)
                {
                    ReadOnlySpan<byte> row = rgb.Slice(((band * ThumbnailScale) + r) * stride, stride);
                    ReadOnlySpan<Vector<byte>> bytes = MemoryMarshal.Cast<byte, Vector<byte>>(row[..vectorEnd]);
                    for (int v = 0; v < bytes.Length; v++)
                    {
                        Vector.Widen(bytes[v], out Vector<ushort> low, out Vector<ushort> high);
                        wide[2 * v] += low;
                        wide[(2 * v) + 1] += high;
                    }

                    for (int i = vectorEnd; i < stride; i++)
                    {
                        columns[i] += row[i];
                    }
                }

                Span<byte> outRow = thumbnail.Slice(band * outStride, outStride);
                for (int x = 0; x < outWidth; x++)
                {
                    ReadOnlySpan<ushort> block = columns.Slice(x * ThumbnailScale * 3, ThumbnailScale * 3);
                    int r = 0, g = 0, b = 0;
                    for (int k = 0; k < ThumbnailScale * 3; k += 3)
                    {
                        r += block[k];
                        g += block[k + 1];
                        b += block[k + 2];
                    }

                    outRow[x * 3] = (byte)((r + 32) >> 6);
                    outRow[(x * 3) + 1] = (byte)((g + 32) >> 6);
                    outRow[(x * 3) + 2] = (byte)((b + 32) >> 6);
                }
            }
        }
        finally
        {
            ArrayPool<ushort>.Shared.Return(rented);
        }
    }

    // ---- reference versions (the client's check): the obvious loops ----

    public static HistogramResult ReferenceHistogram(ReadOnlySpan<byte> rgb, int width, int height)
    {
        long pixels = CheckFrame(rgb.Length, width, height);
        var result = new HistogramResult { Red = new int[256], Green = new int[256], Blue = new int[256], Pixels = pixels };
        long luminance = 0;
        for (long i = 0; i < pixels; i++)
        {
            byte r = rgb[(int)(i * 3)], g = rgb[(int)(i * 3) + 1], b = rgb[(int)(i * 3) + 2];
            result.Red[r]++;
            result.Green[g]++;
            result.Blue[b]++;
            luminance += (299 * r) + (587 * g) + (114 * b);
        }

        result.MeanLuminance = MeanLuminance(luminance, pixels);
        return result;
    }

    public static ChannelStats ReferenceNormalizeStats(ReadOnlySpan<float> batch, int images, int channels, int height, int width)
    {
        int plane = CheckBatch(batch.Length, images, channels, height, width);
        double[] sum = new double[channels];
        double[] squares = new double[channels];
        for (int i = 0; i < batch.Length; i++)
        {
            int channel = i / plane % channels;
            double value = batch[i];
            sum[channel] += value;
            squares[channel] += value * value;
        }

        return Stats(sum, squares, (long)images * plane);
    }

    public static byte[] ReferenceThumbnail(ReadOnlySpan<byte> rgb, int width, int height)
    {
        CheckFrame(rgb.Length, width, height);
        int outWidth = width / ThumbnailScale, outHeight = height / ThumbnailScale;
        byte[] thumbnail = new byte[outWidth * outHeight * 3];
        for (int y = 0; y < outHeight; y++)
        {
            for (int x = 0; x < outWidth; x++)
            {
                for (int c = 0; c < 3; c++)
                {
                    int sum = 0;
                    for (int dy = 0; dy < ThumbnailScale; dy++)
                    {
                        for (int dx = 0; dx < ThumbnailScale; dx++)
                        {
                            sum += rgb[((((y * ThumbnailScale) + dy) * width) + (x * ThumbnailScale) + dx) * 3 + c];
                        }
                    }

                    thumbnail[(((y * outWidth) + x) * 3) + c] = (byte)((sum + 32) / 64);
                }
            }
        }

        return thumbnail;
    }

    // ---- shared helpers ----

    public static int ThumbnailBytes(int width, int height) => width / ThumbnailScale * (height / ThumbnailScale) * 3;

    public static void CheckThumbnail(int length, int width, int height)
    {
        if (width % ThumbnailScale != 0 || height % ThumbnailScale != 0)
        {
            throw new ArgumentException($"A {width}x{height} frame does not divide into {ThumbnailScale}x{ThumbnailScale} blocks.");
        }

        if (length != ThumbnailBytes(width, height))
        {
            throw new ArgumentException($"The thumbnail buffer holds {length} bytes, not {ThumbnailBytes(width, height)}.");
        }
    }

    /// <summary>The pixel count of a <paramref name="width"/> x <paramref name="height"/> RGB frame of <paramref name="length"/> bytes; throws when they disagree.</summary>
    public static long CheckFrame(int length, int width, int height)
    {
        if (width <= 0 || height <= 0 || length != (long)width * height * 3)
        {
            throw new ArgumentException($"The frame holds {length} bytes, not {width}x{height}x3.");
        }

        return (long)width * height;
    }

    private static int CheckBatch(int length, int images, int channels, int height, int width)
    {
        if (images <= 0 || channels <= 0 || height <= 0 || width <= 0 || length != (long)images * channels * height * width)
        {
            throw new ArgumentException($"The batch holds {length} values, not {images}x{channels}x{height}x{width}.");
        }

        return height * width;
    }

    private static double MeanLuminance(long weightedSum, long pixels) => weightedSum / (1000.0 * pixels);

    private static ChannelStats Stats(double[] sum, double[] squares, long count)
    {
        var stats = new ChannelStats { Mean = new double[sum.Length], Std = new double[sum.Length], ValuesPerChannel = count };
        for (int c = 0; c < sum.Length; c++)
        {
            double mean = sum[c] / count;
            stats.Mean[c] = mean;
            stats.Std[c] = Math.Sqrt(Math.Max(0, (squares[c] / count) - (mean * mean)));
        }

        return stats;
    }

    private static ulong XorShift(ref ulong state)
    {
        ulong x = state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state = x;
        return x;
    }
}
