using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>
/// Makes the managed array a method's result or its one buffer argument is (a <c>T[]</c> of a primitive
/// element type), so that a transport that copies a message's bytes into this process (gRPC) fills that
/// array as they arrive and the generated decoder or stub takes it as it is, instead of receiving them
/// into a lease and copying them out again.
/// </summary>
internal abstract class ArrayReceiver
{
    /// <summary>
    /// An array of exactly <paramref name="bytes"/> bytes (not cleared: the receiver fills all of them), or
    /// null when they are not a whole number of elements: such a payload goes through a lease, and the
    /// decoder refuses it there as it always has.
    /// </summary>
    public abstract ReceivedArray? TryCreate(long bytes);

    /// <summary>The receiver of a result of type <typeparamref name="TResult"/>: an array of a primitive element type; null for anything else (which keeps the lease).</summary>
    public static ArrayReceiver? For<TResult>() => ResultArrays<TResult>.Receiver;

    /// <summary>The receiver of an argument of array type <paramref name="type"/> (as generated code names it); null for any other type.</summary>
    public static ArrayReceiver? ForArray(Type? type)
    {
        foreach (ArrayReceiver receiver in All)
        {
            if (receiver.ArrayType == type)
            {
                return receiver;
            }
        }

        return null;
    }

    /// <summary>The array type this receiver makes.</summary>
    public abstract Type ArrayType { get; }

    /// <summary>One receiver per primitive element type: a list of constructed types, no reflection (NativeAOT keeps each).</summary>
    private static readonly ArrayReceiver[] All =
    [
        new ArrayReceiver<byte>(), new ArrayReceiver<float>(), new ArrayReceiver<double>(), new ArrayReceiver<int>(),
        new ArrayReceiver<long>(), new ArrayReceiver<short>(), new ArrayReceiver<ushort>(), new ArrayReceiver<uint>(),
        new ArrayReceiver<ulong>(), new ArrayReceiver<sbyte>(), new ArrayReceiver<Half>(), new ArrayReceiver<char>(),
    ];

    /// <summary>The receiver of each result type, looked up once.</summary>
    private static class ResultArrays<TResult>
    {
        public static readonly ArrayReceiver? Receiver = ForArray(typeof(TResult));
    }
}

/// <inheritdoc cref="ArrayReceiver"/>
internal sealed class ArrayReceiver<T> : ArrayReceiver
    where T : unmanaged
{
    public override Type ArrayType => typeof(T[]);

    public override ReceivedArray? TryCreate(long bytes)
    {
        int size = Unsafe.SizeOf<T>();
        return bytes >= 0 && bytes % size == 0 && bytes / size <= Array.MaxLength
            ? new ReceivedArray<T>(GC.AllocateUninitializedArray<T>((int)(bytes / size)))
            : null;
    }
}

/// <summary>A payload's array while its bytes arrive (<see cref="ArrayReceiver"/>).</summary>
internal abstract class ReceivedArray
{
    /// <summary>The array's bytes, written in order as they arrive.</summary>
    public abstract Span<byte> Bytes { get; }

    public abstract long ByteLength { get; }
}

/// <inheritdoc cref="ReceivedArray"/>
internal sealed class ReceivedArray<T>(T[] array) : ReceivedArray
    where T : unmanaged
{
    public T[] Array => array;

    public override Span<byte> Bytes => MemoryMarshal.AsBytes(array.AsSpan());

    public override long ByteLength => (long)array.Length * Unsafe.SizeOf<T>();
}
